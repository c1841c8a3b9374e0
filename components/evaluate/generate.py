"""One model replica answering encoded prompts greedily, in left-padded batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import GenerationConfig

from components.config import DuetConfig
from components.data.dataset import load_tokenizer, local_processor_dir
from components.data.transform import ImageSpec, load_image_spec, normalize
from components.model.artifact import load_stage_model
from components.model.llava import load_base_model


def inference_dtype(cfg: DuetConfig, device: torch.device) -> torch.dtype:
    """fp32 on CPU; on GPUs the training precision (auto: bf16 where the GPU has it, else fp16)."""
    if device.type != "cuda":
        return torch.float32
    precision = cfg.deepspeed.precision
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def load_model(cfg: DuetConfig, model_source: str | None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The bare base checkpoint (model_source None) or a stage artifact's model, in eval mode."""
    model = load_base_model(cfg, dtype) if model_source is None else load_stage_model(cfg, model_source, dtype)
    return model.eval()


def batch_inputs(prompts: Sequence[np.ndarray], images: Sequence[np.ndarray], pad: int, spec: ImageSpec,
                 device: torch.device, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
    """generate()'s inputs for a batch: prompts left-padded to the longest (answers start at one column,
    the attention mask hides the padding), every row's images normalised in row order; and that length."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, length - len(ids):] = torch.tensor(np.asarray(ids, dtype=np.int64))  # a copy: Ray's are read-only
        mask[row, length - len(ids):] = 1
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    arrays = [np.asarray(a, dtype=np.uint8) for a in images if len(a)]
    if arrays:
        pixels = normalize(np.concatenate(arrays), spec)
        inputs["pixel_values"] = torch.from_numpy(pixels).to(device, dtype)
    return inputs, length


class Generator:
    """One model replica answering encoded prompts greedily, in left-padded batches."""

    def __init__(self, cfg: DuetConfig, model_source: str | None, processor_dir: str,
                 device: str | torch.device | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = inference_dtype(cfg, self.device)
        self.model = load_model(cfg, model_source, self.dtype).to(self.device)
        local = local_processor_dir(processor_dir, cfg.storage)
        self.tokenizer = load_tokenizer(local)
        self.spec = load_image_spec(local)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[np.ndarray], images: Sequence[np.ndarray], max_new_tokens: int) -> list[str]:
        """Greedy answers; prompts are token ids (PromptBuilder.encode), images uint8 (n_i, H, W, 3) per prompt."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image arrays: one (possibly empty) per prompt")
        if not prompts:
            return []
        pad = int(self.tokenizer.pad_token_id)
        inputs, length = batch_inputs(prompts, images, pad, self.spec, self.device, self.dtype)
        settings = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id, bos_token_id=self.tokenizer.bos_token_id,
        )
        output = self.model.generate(**inputs, generation_config=settings)
        return [text.strip() for text in self.tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)]
