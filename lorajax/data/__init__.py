"""Input pipelines over real text shipped by pip packages (no network at run time), and SYNTHETIC data for the
tasks beyond text: thin-structure images (`curves`), shape scenes with questions (`scenes`), a protein grammar with
an exact oracle (`proteins`)."""
