"""Layer analysis the paper draws (Figures 3 and 4): per-layer importance and per-layer weight change.

Both quantities are indexed by the decoder layer ``n`` of the parameters named ``model.layers.{n}.*`` (the
naming of Qwen2, Llama, Mistral and the toy model in transformers) and are summed over the layer's *weight
matrices*: the 2-D ``*.weight`` parameters of the layer, which in these architectures are exactly the linear
projections (q/k/v/o, gate/up/down). Norm weights and biases (1-D) are excluded, as the paper sums over weight
matrices; the same predicate (:func:`layer_of_matrix`) is used by both analyses so their figures are comparable.

- :func:`layer_importance` is the first-order Taylor score I^n = Σ_W Σ |∂L(D)/∂W ⊙ W| with L(D) the causal-LM
  loss on the response tokens of a set of (prompt, response) pairs, computed with transformers + torch.
- :func:`weight_change` is ΔW^n = Σ_k ‖W^{k,n}_after − W^{k,n}_before‖_F, streamed tensor by tensor (in row
  blocks) through ``safetensors.safe_open`` so it runs on checkpoints larger than memory.

The IIMM merge reads the importance CSV written by :func:`write_layer_csv`: columns exactly ``layer,importance``
with an integer layer index. This module is pure (torch, safetensors, transformers, pandas, matplotlib): no Ray.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

from imm_ray.tokens import encode_pair  # the one tokenising helper of generation, SFT and analysis

LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\..+\.weight$")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Weight change reads each matrix in row blocks of at most this many entries (float64 after conversion: 32 MiB),
# so peak memory is bounded whatever the size of one matrix.
BLOCK_ELEMENTS = 1 << 22


class AnalysisError(ValueError):
    """Bad user input to an analysis (checkpoint format, mismatched checkpoints, unusable pairs).

    The CLI turns it into a one-line error with exit code 2.
    """


def layer_of_matrix(name: str, ndim: int) -> int | None:
    """The layer index of a weight matrix of a decoder layer, or None for any other parameter."""
    match = LAYER_PATTERN.match(name)
    if match is None or ndim != 2:
        return None
    return int(match.group(1))


# ----------------------------------------------------------------------------------------------- checkpoints


def checkpoint_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Map every tensor name of an HF safetensors folder to the file holding it, reading headers only.

    Accepts a sharded folder (``model.safetensors.index.json``), a single ``model.safetensors``, or other
    ``*.safetensors`` files. A folder with only pickle checkpoints (``pytorch_model.bin`` ...) is refused: this
    project never unpickles.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder not found: {root}")
    if (root / INDEX_FILE).is_file():
        return _files_from_index(root / INDEX_FILE)
    files = [root / SINGLE_FILE] if (root / SINGLE_FILE).is_file() else sorted(root.glob("*.safetensors"))
    if not files:
        raise AnalysisError(_no_safetensors_message(root))
    return _files_from_headers(files)


def _files_from_index(index_path: Path) -> dict[str, Path]:
    """Read a sharded checkpoint's weight map and check every shard it names exists."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise AnalysisError(f"{index_path}: not a safetensors index (no readable 'weight_map'): {error}") from None
    files = {name: index_path.parent / shard for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
        if not shard.is_file():
            raise AnalysisError(f"{index_path} names shard {shard.name}, which is missing from {shard.parent}")
    return files


def _files_from_headers(files: Sequence[Path]) -> dict[str, Path]:
    """List the tensors of unindexed safetensors files; a tensor in two files is ambiguous and refused."""
    owner: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name in owner:
                    raise AnalysisError(f"tensor {name} is in both {owner[name]} and {path}")
                owner[name] = path
    return owner


def _no_safetensors_message(root: Path) -> str:
    """Say why a folder has no usable weights, naming pickle checkpoints when that is what it holds."""
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return (
            f"{root} holds only pickle checkpoints ({', '.join(pickles)}); imm-ray never unpickles: "
            "convert them to safetensors first (load them yourself where you trust them, then save_pretrained)"
        )
    return f"{root} holds no *.safetensors weights"


# ----------------------------------------------------------------------------------------------- weight change


def weight_change(before_dir: str | os.PathLike[str], after_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """ΔW^n = Σ_k ‖W_after^{k,n} − W_before^{k,n}‖_F over the weight matrices k of each layer n.

    Streams: each pair of matrices is read in row blocks through ``safe_open`` slices and the squared
    differences are summed in float64, so the two dtypes may differ (bf16 vs float32) and no whole model is in
    memory. The two folders must hold the same layer matrices with the same shapes; any difference is an
    :class:`AnalysisError` naming the tensor and files. Columns: ``layer`` (int), ``weight_change`` (float).
    """
    before, after = checkpoint_files(before_dir), checkpoint_files(after_dir)
    names = _matched_matrices(before, after)
    totals: dict[int, float] = {}
    with ExitStack() as stack:
        open_file = _handle_cache(stack)
        for name, layer in names.items():
            norm = _frobenius_distance(name, open_file(before[name]), open_file(after[name]))
            totals[layer] = totals.get(layer, 0.0) + norm
    return _layer_frame(totals, "weight_change")


def _matched_matrices(before: dict[str, Path], after: dict[str, Path]) -> dict[str, int]:
    """The layer matrices of ``before`` with their layer index, after checking ``after`` has the same ones."""
    with ExitStack() as stack:
        open_file = _handle_cache(stack)
        mats_before = _layer_matrices(before, open_file)
        mats_after = _layer_matrices(after, open_file)
    for name in sorted(mats_before.keys() ^ mats_after.keys()):
        has, lacks = (before, after) if name in mats_before else (after, before)
        raise AnalysisError(
            f"tensor {name} is a layer matrix in {has[name]} but not in {_folder_of(lacks)}: "
            "the two checkpoints do not have the same architecture"
        )
    for name, (_, shape) in mats_before.items():
        if shape != mats_after[name][1]:
            raise AnalysisError(
                f"tensor {name}: shape {list(shape)} in {before[name]} vs {list(mats_after[name][1])} in {after[name]}"
            )
    if not mats_before:
        raise AnalysisError(f"no layer matrices named model.layers.<n>.*.weight in {_folder_of(before)}")
    return {name: layer for name, (layer, _) in sorted(mats_before.items(), key=lambda item: item[1][0])}


def _layer_matrices(files: dict[str, Path], open_file) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Layer index and shape of every layer matrix of a checkpoint, from the safetensors headers only."""
    found: dict[str, tuple[int, tuple[int, ...]]] = {}
    for name, path in files.items():
        if LAYER_PATTERN.match(name) is None:
            continue
        shape = tuple(open_file(path).get_slice(name).get_shape())
        layer = layer_of_matrix(name, len(shape))
        if layer is not None:
            found[name] = (layer, shape)
    return found


def _handle_cache(stack: ExitStack):
    """Open each safetensors file once (memory-mapped, cheap) and keep it open until ``stack`` closes."""
    handles: dict[Path, object] = {}

    def open_file(path: Path):
        if path not in handles:
            handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
        return handles[path]

    return open_file


def _frobenius_distance(name: str, before, after) -> float:
    """‖after − before‖_F of one matrix, accumulated over row blocks in float64."""
    slice_before, slice_after = before.get_slice(name), after.get_slice(name)
    squares = 0.0
    for start, stop in _row_blocks(slice_before.get_shape()):
        diff = slice_after[start:stop].to(torch.float64) - slice_before[start:stop].to(torch.float64)
        squares += float(torch.sum(diff * diff))
    return squares**0.5


def _row_blocks(shape: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Row ranges of a matrix holding at most :data:`BLOCK_ELEMENTS` entries each (at least one row)."""
    rows, cols = shape
    step = max(1, BLOCK_ELEMENTS // max(1, cols))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _folder_of(files: dict[str, Path]) -> Path:
    """The folder of a checkpoint, for error messages."""
    return next(iter(files.values())).parent


# ----------------------------------------------------------------------------------------------- importance


def layer_importance(
    model_dir: str | os.PathLike[str],
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int = 2048,
    device: str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """I^n = Σ_W Σ |∂L(D)/∂W ⊙ W| over the weight matrices W of each layer n (first-order Taylor score).

    L(D) is the mean negative log-likelihood over *all response tokens of D* (one token-level mean over the
    whole set, prompt tokens unlabelled): each batch's summed token loss is divided by the total number of
    response tokens before ``backward``, so the gradients accumulated over batches are exactly ∂L(D)/∂W and the
    result does not depend on ``batch_size``, padding or order. The model is loaded with transformers
    (``AutoModelForCausalLM``, safetensors only, no remote code) in float32, in eval mode (no dropout). Only the
    layer matrices require gradients. Columns: ``layer`` (int), ``importance`` (float).
    """
    if batch_size < 1 or max_length < 2:
        raise AnalysisError(f"batch_size must be >= 1 and max_length >= 2 (got {batch_size}, {max_length})")
    model, tokenizer = _load_model(model_dir, device)
    encoded = _encode_pairs(tokenizer, pairs, max_length)
    matrices = _track_layer_matrices(model)
    n_tokens = sum(sum(label != -100 for label in labels[1:]) for _, labels in encoded)  # position 0 has no prefix
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for batch in _batches(encoded, batch_size, progress):
        ids, labels, mask = (t.to(device) for t in _collate(batch, pad_id))
        _summed_response_nll(model, ids, labels, mask).div(n_tokens).backward()
    return _layer_frame(_taylor_scores(matrices), "importance")


def _load_model(model_dir: str | os.PathLike[str], device: str):
    """Model (float32, eval) and tokenizer of an HF folder, after checking it has safetensors weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy import, only where needed

    root = Path(model_dir)
    checkpoint_files(root)  # clear errors for a missing folder or a pickle-only checkpoint, before loading
    if not (root / "config.json").is_file():
        raise AnalysisError(f"{root} has no config.json: not a Hugging Face model folder")
    model = AutoModelForCausalLM.from_pretrained(
        root, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    return model.to(device).eval(), tokenizer


def _encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Encode every pair, refusing (before any model work) a pair whose prompt leaves no response token."""
    if not pairs:
        raise AnalysisError("no (prompt, response) pairs: layer importance needs a non-empty data set")
    encoded = []
    for position, (prompt, response) in enumerate(pairs):
        ids, labels = encode_pair(tokenizer, prompt, response, max_length)
        if all(label == -100 for label in labels[1:]):
            raise AnalysisError(
                f"pair {position}: no response token is left within max_length={max_length} "
                "(the prompt fills it, or the response is empty); raise max_length"
            )
        encoded.append((ids, labels))
    return encoded


def _track_layer_matrices(model: torch.nn.Module) -> dict[int, list[torch.nn.Parameter]]:
    """Turn gradients on for the layer matrices only (saves the embedding's large gradient) and group them."""
    matrices: dict[int, list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        layer = layer_of_matrix(name, parameter.dim())
        parameter.requires_grad_(layer is not None)
        parameter.grad = None
        if layer is not None:
            matrices.setdefault(layer, []).append(parameter)
    if not matrices:
        raise AnalysisError("the model has no parameters named model.layers.<n>.*.weight")
    return matrices


def _batches(encoded: list, batch_size: int, progress: bool) -> Iterator[list]:
    """Batches of similar length (sorted, less padding; the sum is order-free), under a rich progress bar."""
    from rich.progress import track

    ordered = sorted(encoded, key=lambda pair: len(pair[0]))
    batches = [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
    return iter(track(batches, description="layer importance", disable=not progress, transient=True))


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad a batch: pad ids, labels −100 and attention mask 0 on the padding."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (row_ids, row_labels) in enumerate(batch):
        ids[row, : len(row_ids)] = torch.tensor(row_ids)
        labels[row, : len(row_labels)] = torch.tensor(row_labels)
        mask[row, : len(row_ids)] = 1
    return ids, labels, mask


def _summed_response_nll(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the labelled tokens of −log p(token | prefix): logits at t predict the token at t+1."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def _taylor_scores(matrices: dict[int, list[torch.nn.Parameter]]) -> dict[int, float]:
    """Σ |grad ⊙ W| per layer, summed in float64."""
    return {
        layer: sum(float(torch.sum(torch.abs(p.grad * p.detach()), dtype=torch.float64)) for p in params)
        for layer, params in matrices.items()
    }


# ----------------------------------------------------------------------------------------------- outputs


def _layer_frame(values: dict[int, float], column: str) -> pd.DataFrame:
    """A two-column frame ``layer, <column>`` sorted by layer, with an integer layer index."""
    layers = sorted(values)
    return pd.DataFrame({"layer": pd.Series(layers, dtype="int64"), column: [values[n] for n in layers]})


def write_layer_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a per-layer frame as CSV (no index), atomically: a reader never sees a half-written file."""
    target = Path(path)
    if "layer" not in df.columns or not pd.api.types.is_integer_dtype(df["layer"]):
        raise AnalysisError(f"{target}: a layer table needs an integer 'layer' column (got {list(df.columns)})")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".tmp", delete=False) as handle:
        df.to_csv(handle, index=False)
    os.replace(handle.name, target)
    return target


def plot_layers(df: pd.DataFrame, value_column: str, path: str | os.PathLike[str], title: str) -> Path:
    """A PNG bar plot of one value per layer, like the paper's Figures 3 and 4.

    Uses matplotlib's object API with the Agg canvas, so no GUI backend or pyplot global state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if value_column not in df.columns:
        raise AnalysisError(f"no column {value_column!r} to plot (columns: {list(df.columns)})")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(max(6.0, 0.25 * len(df)), 3.5), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.bar(df["layer"], df[value_column], color="tab:blue")
    axes.set(xlabel="layer", ylabel=value_column.replace("_", " "), title=title)
    axes.set_xticks(list(df["layer"]))
    figure.savefig(target, format="png", dpi=120)
    return target
