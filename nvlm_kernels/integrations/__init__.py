"""Where our ops meet the frameworks users already run: ``integrations.transformers`` (patch a
Hugging Face InternVL / Mllama / NVLM-D model in one call; the ``"nvlm"`` attention function) and
``integrations.vllm`` (the vLLM plugin). Each imports its framework lazily: importing
``nvlm_kernels`` never imports them, and nothing below this package imports it.
"""
