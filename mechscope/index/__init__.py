"""Max-activating examples, histograms and densities of neurons (and any site's dimensions), in DuckDB."""
