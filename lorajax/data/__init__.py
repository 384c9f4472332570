"""Input pipelines over real text shipped by pip packages (no network at run time)."""
