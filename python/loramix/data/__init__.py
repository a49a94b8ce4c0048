"""Dataset readers: JSON lines, JSON, CSV, Parquet/Arrow files and Hugging Face dataset folders,
streamed as text records (:mod:`~loramix.data.readers`)."""
