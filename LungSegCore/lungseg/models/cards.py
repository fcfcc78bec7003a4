"""Shipped and user-supplied trained models: safetensors weights plus a JSON model card.

A model is `<name>.safetensors` with `<name>.json` beside it, and the ONNX graphs that inference runs, which read
their weights from the safetensors file (`training/export_onnx.py`). The card records the network and its
parameters, the input size, the lung definition, the data, the recipe, the training time, the measured metrics and
the SHA-256 of the weights and of each graph, which are verified before loading. Reading cards needs no torch
(the Slicer module lists models before onnxruntime is installed). Models are looked up by name in the package's
`models/shipped/` folder and in the folders of `LUNGSEG_MODELS_PATH`; a name found in two of them is an error, not
a silent choice. `--model` also takes the path of a card or weights file (offline import).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..definitions import DEFAULT_DEFINITION, DEFINITIONS
from ..errors import LungSegError
from ..io.files import atomic_path, write_atomic_text

PACKAGE_MODELS = Path(__file__).parent / "shipped"
ORIENTATION_CARD = Path(__file__).parent / "orientation" / "orientation.json"  # not a segmentation model
DEFAULT_MODEL = "unet"


def model_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("LUNGSEG_MODELS_PATH", "").split(os.pathsep) if p]
    return [PACKAGE_MODELS, *extra]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cards_named(name: str) -> list[Path]:
    """The cards of the models called `name` in the models folders (a folder named twice counts once)."""
    cards = (folder / f"{name}.json" for folder in model_dirs())
    return list({card.resolve(): card for card in cards if card.exists()}.values())


def find_card(name_or_path: str | Path) -> Path:
    """Card path for a model name, a card path or a weights path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".json", ".safetensors") and candidate.exists():
        return candidate.with_suffix(".json")
    found = cards_named(str(name_or_path))
    if len(found) > 1:  # a user's model named like a shipped one: never pick one of them silently
        raise LungSegError(
            f"model '{name_or_path}' is in more than one models folder ({', '.join(map(str, found))}); "
            f"give the card's path (--model {found[-1]}), or export it under another name "
            "(lungseg export --name)"
        )
    if found:
        return found[0]
    known = ", ".join(sorted(c["name"] for c in list_models())) or "none"
    raise LungSegError(f"unknown model '{name_or_path}'; available: {known}")


def read_card(name_or_path: str | Path) -> dict:
    card_path = find_card(name_or_path)
    card = json.loads(card_path.read_text())
    card["card_path"] = str(card_path)
    card["weights_path"] = str(card_path.with_suffix(".safetensors"))
    return card


def list_models() -> list[dict]:
    cards = []
    for folder in model_dirs():
        for card in sorted(folder.glob("*.json")):
            try:
                data = json.loads(card.read_text())
            except ValueError:
                continue  # not a card
            # a card beside what inference runs (its graphs) or what training loads (its weights)
            if (
                isinstance(data, dict)
                and "network" in data
                and ("onnx" in data or card.with_suffix(".safetensors").exists())
            ):
                data["card_path"] = str(card)
                cards.append(data)
    return cards


def mean_val_dice(card: dict) -> float:
    values = [m["both_dice"]["mean"] for m in card.get("metrics", {}).values() if "both_dice" in m]
    return sum(values) / len(values) if values else 0.0


def best_model(definition: str) -> str:
    """Name of the available model of this lung definition with the best mean validation Dice."""
    if definition not in DEFINITIONS:
        raise LungSegError(f"unknown lung definition '{definition}'; choose {' or '.join(DEFINITIONS)}")
    cards = [c for c in list_models() if c.get("definition") == definition]
    if not cards:
        raise LungSegError(f"no available model follows the '{definition}' definition")
    return max(cards, key=mean_val_dice)["name"]


def resolve_model(model: str | None, definition: str | None) -> str:
    """`--model` picks exactly; otherwise the best model of `--definition` (lung fields by default)."""
    return model if model else best_model(definition or DEFAULT_DEFINITION)


def verified(path: Path, expected: str, model: str) -> Path:
    """`path`, once its SHA-256 is the card's: a file that is corrupt or not the one the card describes is refused."""
    if not path.exists():
        raise LungSegError(f"{path}: file missing for model '{model}'")
    actual = sha256_of(path)
    if actual != expected:
        raise LungSegError(
            f"{path}: checksum mismatch (expected {expected}, got {actual}); "
            "the file is corrupt or not the one the card describes"
        )
    return path


def load_graphs(name_or_path: str | Path, device: str = "auto", threads: int | None = None) -> tuple[list, dict]:
    """The card's verified ONNX graphs as ONNX Runtime sessions, each with its input size, and the card. The
    graphs read their weights from the model's safetensors file (`onnx.weights`), which is verified too."""
    from ..inference.runtime import open_session

    card = read_card(name_or_path)
    if "onnx" not in card:
        raise LungSegError(
            f"model '{card['name']}' has no ONNX graph ({card['card_path']}); add one with "
            f"`lungseg export --from-model {card['card_path']}` (needs lungseg[train])"
        )
    folder = Path(card["card_path"]).parent
    if "weights" in card["onnx"]:  # graphs exported before they shared the weights hold their own
        verified(folder / card["onnx"]["weights"], card["sha256"], card["name"])
    graphs = [
        (
            open_session(verified(folder / graph["file"], graph["sha256"], card["name"]), device, threads),
            int(graph["input_size"]),
        )
        for graph in card["onnx"]["graphs"]
    ]
    return graphs, card


def load_network(name_or_path: str | Path, device="cpu"):
    """The card's torch network with its verified safetensors weights (no pickle, no code execution): for
    training (`init_from`), fine-tuning and export."""
    from safetensors.torch import load_file

    from ..nets.networks import build_network

    card = read_card(name_or_path)
    weights = verified(Path(card["weights_path"]), card["sha256"], card["name"])
    model = build_network(card["network"]["name"], **card["network"].get("params", {}))
    model.load_state_dict(load_file(str(weights), device="cpu"))
    return model.to(device).eval(), card


def save_model(model, card: dict, out_dir: str | Path) -> Path:
    """Write `<name>.safetensors` and its card with the checksum, each atomically; returns the card path."""
    return save_card(save_weights(model, card, out_dir), out_dir)


def save_weights(model, card: dict, out_dir: str | Path) -> dict:
    """Write `<name>.safetensors` atomically; returns the card with the weights' checksum."""
    from safetensors.torch import save_file

    weights = Path(out_dir) / f"{card['name']}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"name": card["name"], "network": card["network"]["name"]})
    return dict(card, sha256=sha256_of(weights))


def save_card(card: dict, out_dir: str | Path) -> Path:
    """Write the card `<name>.json` atomically (without the paths `read_card` adds); returns its path."""
    card = {k: v for k, v in card.items() if k not in ("card_path", "weights_path")}
    card_path = Path(out_dir) / f"{card['name']}.json"
    write_atomic_text(json.dumps(card, indent=2) + "\n", card_path)
    return card_path
