"""Tiny random-weight Hugging Face models built fully offline, for tests, demos and benchmarks.

Not used by the jobs or the operators. The modules, each importing only those above it:

* this package: the kind names (no imports, so ``hfllm --help`` lists them without torch),
* :mod:`.tokenizer`: the one byte-level BPE tokenizer (vocabulary, corpus, special tokens),
* :mod:`.weights`: wide random weights and EOS calibration, shared by the text and vision models,
* :mod:`.text`: the causal LM and the safety checkers (seq2seq, classifier, Llama Guard),
* :mod:`.vision`: the Qwen2.5-VL and Qwen3-VL (dense, MoE) models with their image processor,
* :mod:`.models`: ``make_tiny_model(path, kind)``, the one entry by kind (``hfllm make-tiny-model``).
"""

SAFETY_KINDS = ("seq2seq-safety", "classifier-safety", "llama-guard")
KINDS = ("causal-lm", *SAFETY_KINDS, "vision")
VERDICTS = ("safe", "unsafe")
