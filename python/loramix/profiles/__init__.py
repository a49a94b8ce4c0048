"""What loramix measures of a dataset: token histograms under the bank's tokenizer
(:mod:`~loramix.profiles.tokens`) and sentence embeddings with an ONNX encoder
(:mod:`~loramix.profiles.encoder`, :mod:`~loramix.profiles.onnx_bert`), stored in the profile
(:mod:`~loramix.profiles.embeddings`)."""
