"""Calibration for the quantized builds: the calibration text, and the largest magnitude each
channel of each projection's input reaches over it, measured on the exported graph by ONNX Runtime
(prefill of each paragraph from an empty cache). The Q/DQ graphs TensorRT quantizes activations
in (int8, fp8) smooth with those channel maxima and take one static scale per tensor from them.

The default text is a few paragraphs of plain English prose written for this purpose; a user's
own text (`--calibration-text`, paragraphs separated by blank lines) represents their traffic
better, and the report says which was used. GPTQ needs more tokens than those paragraphs hold (its
X^T X must see every input direction): without a user's text it adds sequences the model samples
itself from its first token (data-free, seeded), as LLM-QAT's data-free recipe does."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_TEXT = """\
The harbour was quiet before dawn. Fishing boats rocked against their moorings, and the only sound
was the slap of water on the stone steps where the ferry would arrive at six.

To replace a bicycle chain, shift to the smallest sprocket, open the quick link with pliers, and
thread the new chain through the derailleur before you measure it against the old one.

Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. The reactions that
depend on light happen in the thylakoid membranes; the Calvin cycle runs in the stroma.

Dear Ms. Okafor, thank you for your letter of 12 March. We have rescheduled the inspection for
Thursday at 10:30 and will send the revised report by the end of the month.

def mean(values):
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)

Q: How many minutes are there in a week? A: 7 days x 24 hours x 60 minutes = 10,080 minutes.

In 1869 the first transcontinental railroad in the United States was completed, cutting the
journey from coast to coast from months to about a week.

She opened the window, listened for the rain, and decided the walk to the library could wait
until the afternoon, when the streets would be dry and the market closed.

The committee's recommendation: raise the reserve from 4% to 6%, review supplier contracts every
two years, and publish the audit summary on the public website.

Bonjour! Wie geht es dir? ¿Dónde está la estación? 東京は大きな都市です。 Emoji 🙂 and symbols: ≤ ≥ ± €.
"""


@dataclass(frozen=True)
class Calibration:
    """The build's calibration options. `text`: paragraphs to calibrate on (None: DEFAULT_TEXT);
    `gptq`: torch-cuda's fp8 / int8-wo weights take GPTQ's rounding over it (`model.gptq`) instead
    of the nearest value. TensorRT's int8 / fp8 Q/DQ graphs always calibrate their activations."""

    text: str | None = None
    gptq: bool = False

    def describe(self) -> str:
        if self.text:
            return "--calibration-text"
        extra = f" + {GENERATED[0]} sequences of {GENERATED[1]} tokens sampled from the model" if self.gptq else ""
        return "the built-in text" + extra

    def check(self, runtime: str, quantization: str) -> None:
        if self.gptq and (runtime != "torch-cuda" or quantization not in ("fp8", "int8-wo")):
            raise ValueError(
                f"--gptq rounds torch-cuda's fp8 / int8-wo weights, not runtime={runtime!r} "
                f"quantization={quantization!r}: add --runtime torch-cuda --quantization fp8 (or int8-wo), "
                "or drop --gptq"
            )


GENERATED = (32, 256)  # GPTQ's data-free sequences: how many, tokens each


def gptq_prompts(checkpoint: Path, calibration: Calibration) -> list[list[int]]:
    """GPTQ's calibration set: the user's text if given, else the built-in text and sequences the
    model samples itself."""
    if calibration.text:
        return calibration_prompts(checkpoint, calibration.text)
    return calibration_prompts(checkpoint) + generated_prompts(checkpoint, *GENERATED)


def generated_prompts(checkpoint: Path, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` sequences of `length` tokens sampled from the model (temperature 1, no truncation)
    from its BOS token (EOS where it has none), EOS held back until the end; seeded."""
    import torch

    from ..model.modeling import load_hf

    hf = load_hf(checkpoint)
    cfg = hf.generation_config
    start = next((t for t in (cfg.bos_token_id, cfg.eos_token_id, 0) if isinstance(t, int)), 0)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        first = torch.full((count, 1), start)
        out = hf.generate(
            first,
            attention_mask=torch.ones_like(first),  # said, not guessed: the start token may double as padding
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=length - 1,
            min_new_tokens=length - 1,
            pad_token_id=start,
        )
    return out.tolist()


def calibration_prompts(tokenizer_dir: Path, text: str | None = None, max_tokens: int = 256) -> list[list[int]]:
    """Token ids of each paragraph (blank-line separated), at most `max_tokens` each."""
    from ..text import TokenizerFiles

    tok = TokenizerFiles(tokenizer_dir)
    paragraphs = [p.strip() for p in (text or DEFAULT_TEXT).split("\n\n") if p.strip()]
    prompts = [tok.encode(p)[:max_tokens] for p in paragraphs]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError("the calibration text has no paragraphs: give text with at least one non-empty paragraph")
    return prompts


def channel_absmax(onnx_path: Path, feeds: list[dict], tensors: list[str]) -> dict[str, np.ndarray]:
    """max |x| over the feeds of each named tensor [..., K], per channel K (the last axis): the
    graph run by ONNX Runtime with an Abs -> ReduceMax -> Cast output added for each tensor (its
    calibrators reduce per tensor or keep axis 1, not the channels a MatMul's input has last)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    graph, names = model.graph, []
    axes = {"axes": [0, 1]}
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        graph.initializer.append(numpy_helper.from_array(np.array([0, 1], dtype=np.int64), "_calibrate_axes"))
        axes = {}
    for i, name in enumerate(tensors):
        reduce_inputs = [f"_calibrate_abs{i}"] + (["_calibrate_axes"] if not axes else [])
        graph.node.extend(
            [
                helper.make_node("Abs", [name], [f"_calibrate_abs{i}"]),
                helper.make_node("ReduceMax", reduce_inputs, [f"_calibrate_max{i}"], keepdims=0, **axes),
                helper.make_node("Cast", [f"_calibrate_max{i}"], [f"_calibrate_out{i}"], to=TensorProto.FLOAT),
            ]
        )
        graph.output.append(helper.make_tensor_value_info(f"_calibrate_out{i}", TensorProto.FLOAT, None))
        names.append(f"_calibrate_out{i}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calibrate.onnx"
        onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 1.8e9)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        found = [np.max(values, axis=0) for values in zip(*(session.run(names, feed) for feed in feeds))]
    return dict(zip(tensors, found))
