"""The lab around the runtime: benchmarks, sweeps, VRAM profiles, projections, quality metrics, reference images,
reports, plots and `validate`, with the notebooks and reference images they read. The runtime (`fluxkit`) never
imports this package; it needs the `lab` extra (`pip install 'fluxkit[lab]'`)."""
