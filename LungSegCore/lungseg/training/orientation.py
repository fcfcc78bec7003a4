"""Train, evaluate and export the orientation classifier (16 states: D4 x intensity inversion) on frontal chest films.

    python -m lungseg.training.orientation train    --run RUN [--config CFG] [--set training.epochs=2 ...]
    python -m lungseg.training.orientation evaluate --run RUN
    python -m lungseg.training.orientation export   --run RUN [--out DIR]

Self-contained: imports only lungseg.inference.orientation (numpy states, transforms, preprocessing) from the project.
Labels are free: upright train films are augmented, then put into a random state. The run folder holds config.yaml,
the preloaded train/held-out cache (cache.npz), checkpoint.pt (every epoch; `train` resumes from it), log.csv
(stdout goes to train.log when started as documented),
TensorBoard events, evaluation.json and the export. The model is the LAST epoch of a fixed schedule.
"""
from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import ndimage

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "orientation.yaml"


def _geometry():
    """lungseg.inference.orientation; loaded from its file while lungseg/inference.py (a module) shadows the package."""
    try:
        return importlib.import_module("lungseg.inference.orientation")
    except ImportError:
        name = "lungseg_inference_orientation"
        if name in sys.modules:
            return sys.modules[name]
        path = Path(__file__).resolve().parent.parent / "inference" / "orientation.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod


G = _geometry()
STATES = G.STATES
N_STATES = len(STATES)
_K = np.array([s.k for s in STATES])
_M = np.array([s.mirrored for s in STATES])
_I = np.array([s.inverted for s in STATES])


# ----------------------------------------------------------------------------------------------------------- config
def load_config(path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def apply_overrides(cfg: dict, overrides) -> dict:
    """`a.b.c=value` (value parsed as YAML) into the nested dict."""
    for item in overrides or []:
        key, _, value = item.partition("=")
        d = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = yaml.safe_load(value)
    return cfg


# ------------------------------------------------------------------------------------------------------------- data
def read_image(path) -> np.ndarray:
    """2D float64 pixels via SimpleITK (PNG, DICOM: MONOCHROME1 comes back with air dark)."""
    if str(path).lower().endswith(".png"):  # Pillow: SimpleITK's libpng floods stderr with iCCP warnings
        from PIL import Image

        with Image.open(path) as im:
            return G.to_gray(np.asarray(im.convert("F") if im.mode not in ("L", "I;16", "I") else im))
    import SimpleITK as sitk

    return G.to_gray(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


def _splits(x):
    return [x] if isinstance(x, str) else list(x)


def list_set(root, name, splits) -> list[Path]:
    d = Path(root) / name
    with open(d / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    keep = set(_splits(splits))
    return [d / "images" / r["file"] for r in rows if r["split"] in keep]


def heldout_sources(cfg: dict) -> list[tuple[str, Path]]:
    """(set name, path) of every held-out film: the held-out splits, the demo films and the pydicom-data films."""
    d = cfg["data"]
    out = [(e["set"], p) for e in d.get("heldout", []) for p in list_set(d["root"], e["set"], e["split"])]
    if d.get("demo_films"):
        out += [("demo", Path(p)) for p in sorted(glob.glob(str(d["demo_films"])))]
    if d.get("dicom_films"):
        from pydicom.data import get_testdata_file

        out += [("dicom", Path(get_testdata_file(n))) for n in d["dicom_films"]]
    return out


def _thumb(img: np.ndarray) -> np.ndarray:
    """Z-scored 32x32 thumbnail of a raw image, aspect NOT kept (so a squashed square copy matches its original)."""
    h, w = img.shape
    a = ndimage.gaussian_filter(img, (0.5 * h / 32, 0.5 * w / 32), mode="nearest")
    t = ndimage.zoom(a, (32 / h, 32 / w), order=1, mode="nearest", grid_mode=True)[:32, :32].ravel()
    t = (t - t.mean()).astype(np.float32)
    return t / (np.linalg.norm(t) + 1e-6)


def build_cache(cfg: dict, run: Path, log=print) -> dict:
    """Preprocessed upright train and held-out films (float16, input_size^2), cached in run/cache.npz."""
    path = run / "cache.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        return {k: z[k] for k in z.files}
    size = cfg["input_size"]
    d = cfg["data"]
    t0 = time.time()
    tr_set, tr_name, tr, tr_thumb = [], [], [], []
    for e in d["train"]:
        for p in list_set(d["root"], e["set"], e["split"]):
            img = read_image(p)
            tr_set.append(e["set"]), tr_name.append(p.name)
            tr.append(G.preprocess(img, size)), tr_thumb.append(_thumb(img))
    ho = heldout_sources(cfg)
    hx, ho_thumb = [], []
    for _, p in ho:
        img = read_image(p)
        hx.append(G.preprocess(img, size)), ho_thumb.append(_thumb(img))
    hx = np.stack(hx).astype(np.float16)
    tx = np.stack(tr).astype(np.float16)
    # drop train films that are (near) copies of a held-out film
    thr = d.get("dedup_correlation")
    max_corr = (np.stack(tr_thumb) @ np.stack(ho_thumb).T).max(axis=1)
    keep = max_corr <= thr if thr else np.ones(len(tx), bool)
    log(f"cache: {len(tx)} train films ({(~keep).sum()} dropped as near copies of held-out films), {len(hx)} held-out,"
        f" {time.time() - t0:.0f} s")
    cache = {"train_x": tx[keep], "train_set": np.array(tr_set)[keep], "train_name": np.array(tr_name)[keep],
             "dropped_name": np.array([f"{s}/{n}" for s, n, k in zip(tr_set, tr_name, keep) if not k], dtype=str),
             "train_max_corr_heldout": max_corr[keep], "heldout_x": hx, "heldout_set": np.array([s for s, _ in ho]),
             "heldout_path": np.array([str(p) for _, p in ho])}
    tmp = run / "cache.tmp.npz"
    np.savez(tmp, **cache)
    os.replace(tmp, path)
    return cache


# ------------------------------------------------------------------------------------------------------ augmentation
def augment(x: np.ndarray, rng: np.random.Generator, a: dict) -> np.ndarray:
    """Mild augmentation of an upright [0, 1] film; returns it renormalised as preprocess() would."""
    s = x.shape[0]
    x = x.astype(np.float64)
    th = np.deg2rad(rng.uniform(-a["rotate_deg"], a["rotate_deg"]))
    zoom = math.exp(rng.uniform(math.log(a["zoom"][0]), math.log(a["zoom"][1])))
    asp = math.exp(rng.uniform(-a["aspect"], a["aspect"]))
    sc = np.array([1 / (zoom * asp), asp / zoom])
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    mat = rot * sc[None, :]
    c = np.array([(s - 1) / 2] * 2)
    shift = rng.uniform(-a["translate"], a["translate"], 2) * s
    x = ndimage.affine_transform(x, mat, offset=c + shift - mat @ c, order=1, mode="constant",
                                 cval=G.border_value(x))
    x = np.clip(x, 0, 1) ** math.exp(rng.uniform(math.log(a["gamma"][0]), math.log(a["gamma"][1])))
    x = (x - 0.5) * rng.uniform(*a["contrast"]) + 0.5 + rng.uniform(-a["brightness"], a["brightness"])
    if rng.random() < a["blur_prob"]:
        x = ndimage.gaussian_filter(x, rng.uniform(*a["blur_sigma"]))
    if rng.random() < a["noise_prob"]:
        x = x + rng.normal(0, rng.uniform(*a["noise_std"]), x.shape)
    return G.normalize(x)


def synthetic_nonchest(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random non-chest input for outlier exposure: noise, a smooth random field, or random shapes."""
    kind = rng.integers(3)
    if kind == 0:
        x = rng.random((size, size))
    elif kind == 1:
        x = ndimage.gaussian_filter(rng.normal(size=(size, size)), rng.uniform(1, size / 4), mode="wrap")
    else:
        yy, xx = np.mgrid[:size, :size]
        x = np.zeros((size, size))
        for _ in range(rng.integers(1, 6)):
            cy, cx, ry, rx = rng.uniform(0, size, 2).tolist() + rng.uniform(size / 16, size / 2, 2).tolist()
            x += rng.normal() * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
        x = ndimage.gaussian_filter(x, rng.uniform(0, 3))
    return G.normalize(x)


def state_probs(upright_share: float) -> np.ndarray:
    p = np.full(N_STATES, (1 - upright_share) / (N_STATES - 1))
    p[G.UPRIGHT.index] = upright_share
    return p


def apply_state_normalized(idx: int, x: np.ndarray) -> np.ndarray:
    """A state on an already normalised [0, 1] film (inversion = 1 - x, which is what preprocess() of the inverted
    stored film gives, since the percentile window commutes with inversion)."""
    s = STATES[idx]
    y = G.apply_geometry(s, x)
    return 1.0 - y if s.inverted else y


def make_batch(cache: dict, cfg: dict, rng: np.random.Generator):
    t, a = cfg["training"], cfg["augment"]
    bs = t["batch_size"]
    sets = [e["set"] for e in cfg["data"]["train"]]
    w = np.array([e.get("weight", 1.0) for e in cfg["data"]["train"]], float)
    members = [np.flatnonzero(cache["train_set"] == s) for s in sets]
    w = np.where([len(m) > 0 for m in members], w, 0)
    w = w / w.sum()
    labels = rng.choice(N_STATES, size=bs, p=state_probs(t["upright_share"]))
    xs = []
    for lab in labels:
        m = members[rng.choice(len(sets), p=w)]
        x = augment(cache["train_x"][m[rng.integers(len(m))]], rng, a)
        xs.append(apply_state_normalized(int(lab), x))
    n_oe = (t.get("outlier_exposure") or {}).get("per_batch", 0)
    oe = [synthetic_nonchest(rng, cfg["input_size"]) for _ in range(n_oe)]
    x = torch.from_numpy(np.stack(xs + oe).astype(np.float32)[:, None])
    return x, torch.from_numpy(labels), n_oe


# ------------------------------------------------------------------------------------------------------------- model
def build_model(cfg: dict) -> torch.nn.Module:
    from monai.networks.nets import Classifier

    s = cfg["input_size"]
    return Classifier(in_shape=(1, s, s), classes=N_STATES, **cfg["network"]["params"])


def lr_at(step: int, cfg: dict) -> float:
    t = cfg["training"]
    total = t["epochs"] * t["steps_per_epoch"]
    warm = min(t.get("warmup_steps", 0), max(total - 1, 0))
    if step < warm:
        return t["lr"] * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return t["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@torch.inference_mode()
def predict(model: torch.nn.Module, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Softmax (N, 16) for preprocessed (N, S, S) inputs."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.asarray(x[i:i + batch], np.float32)[:, None])
        out.append(torch.softmax(model(xb).float(), 1).numpy())
    return np.concatenate(out) if out else np.zeros((0, N_STATES))


# ------------------------------------------------------------------------------------------------------------ metrics
def state_metrics(true: np.ndarray, probs: np.ndarray) -> dict:
    """Metrics for copies with true state indices `true` and softmax `probs` (N, 16)."""
    pred = probs.argmax(1)
    stored = true == G.UPRIGHT.index
    mir, rot, inv = _M[true], _K[true] != 0, _I[true]
    plain_mirror = true == G.State(0, True, False).index

    def share(mask, ok):
        return float(ok[mask].mean()) if mask.any() else None

    conf = np.zeros((N_STATES, N_STATES), int)
    np.add.at(conf, (true, pred), 1)
    return {
        "n_films": int(stored.sum()), "n_copies": int(len(true)),
        "stored_called_nonupright": share(stored, pred != G.UPRIGHT.index),
        "mirrored_recognised": share(mir, _M[pred]),
        "mirror_only_recognised": share(plain_mirror, pred == true),
        "rotated_right_rotation": share(rot, _K[pred] == _K[true]),
        "inverted_recognised": share(inv, _I[pred]),
        "exact_state": float((pred == true).mean()) if len(true) else None,
        "nonupright_called_upright": share(~stored, pred == G.UPRIGHT.index),
        "maxprob_p01": float(np.percentile(probs.max(1), 1)) if len(true) else None,
        "maxprob_min": float(probs.max(1).min()) if len(true) else None,
        "confusion": conf.tolist(),
    }


def monitor(model, cache: dict, cfg: dict) -> dict:
    """Per-epoch held-out check on the cached upright films (states applied at input size), per set."""
    cap = cfg["data"].get("monitor_max_per_set", 100)
    res = {}
    sets = cache["heldout_set"]
    for s in dict.fromkeys(sets.tolist()):
        idx = np.flatnonzero(sets == s)
        if len(idx) > cap:
            idx = idx[np.linspace(0, len(idx) - 1, cap).round().astype(int)]
        x = cache["heldout_x"][idx].astype(np.float32)
        xs = np.stack([apply_state_normalized(k, f) for f in x for k in range(N_STATES)])
        true = np.tile(np.arange(N_STATES), len(x))
        res[s] = state_metrics(true, predict(model, xs))
    return res


# ------------------------------------------------------------------------------------------------------------ training
def _save_checkpoint(path: Path, **state):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(run, config=None, overrides=None, stop_after_epoch: int | None = None, log=None) -> Path:
    """Train into `run`, resuming from run/checkpoint.pt when it exists (then run/config.yaml is the recipe).

    `stop_after_epoch` ends this call after that epoch (to test resuming). Returns the checkpoint path.
    """
    torch.set_num_threads(1)
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)

    def say(msg):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        (log or print)(line, flush=True) if log is None else log(line)

    cfg_path = run / "config.yaml"
    ckpt_path = run / "checkpoint.pt"
    if ckpt_path.exists() and cfg_path.exists():
        cfg = load_config(cfg_path)
        if overrides:
            say(f"resuming: overrides {overrides} ignored, the run's config.yaml is the recipe")
    else:
        cfg = apply_overrides(load_config(config or DEFAULT_CONFIG), overrides)
        with open(cfg_path, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    t = cfg["training"]
    torch.manual_seed(t["seed"])
    cache = build_cache(cfg, run, log=say)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    rng = np.random.default_rng(t["seed"])
    start = 1
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        rng.bit_generator.state = ck["numpy_rng"]
        torch.set_rng_state(ck["torch_rng"])
        start = ck["epoch"] + 1
        say(f"resumed from epoch {ck['epoch']}")
    say(f"training epochs {start}..{t['epochs']} x {t['steps_per_epoch']} steps, {len(cache['train_x'])} train films,"
        f" {len(cache['heldout_x'])} held-out, {sum(p.numel() for p in model.parameters())} parameters")
    oe_w = (t.get("outlier_exposure") or {}).get("weight", 0.0)
    writer = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "tb"))
    except Exception:  # tensorboard absent: CSV only
        pass
    log_path = run / "log.csv"
    fields = ["epoch", "step", "lr", "loss", "train_acc", "oe_loss", "seconds", "step_ms"]
    mon_keys = ["stored_called_nonupright", "mirrored_recognised", "rotated_right_rotation", "inverted_recognised",
                "exact_state"]
    sets = list(dict.fromkeys(cache["heldout_set"].tolist()))
    fields += [f"{s}:{k}" for s in sets for k in mon_keys]
    if not log_path.exists():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)
    spe = t["steps_per_epoch"]
    for epoch in range(start, t["epochs"] + 1):
        model.train()
        t0 = time.time()
        tot, acc, tot_oe, n = 0.0, 0.0, 0.0, 0
        for i in range(spe):
            step = (epoch - 1) * spe + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            x, y, n_oe = make_batch(cache, cfg, rng)
            logits = model(x)
            nc = len(y)
            loss = torch.nn.functional.cross_entropy(logits[:nc], y)
            loss_oe = -torch.log_softmax(logits[nc:], 1).mean() - math.log(N_STATES) if n_oe else torch.zeros(())
            opt.zero_grad(set_to_none=True)
            (loss + oe_w * loss_oe).backward()
            if t.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
            opt.step()
            tot += loss.item()
            tot_oe += loss_oe.item()
            acc += (logits[:nc].argmax(1) == y).float().mean().item()
            n += 1
        secs = time.time() - t0
        mon = monitor(model, cache, cfg)
        row = {"epoch": epoch, "step": epoch * spe, "lr": f"{lr_at(epoch * spe - 1, cfg):.3g}",
               "loss": f"{tot / n:.4f}", "train_acc": f"{acc / n:.4f}", "oe_loss": f"{tot_oe / n:.4f}",
               "seconds": f"{secs:.1f}", "step_ms": f"{1000 * secs / n:.0f}"}
        for s in sets:
            for k in mon_keys:
                v = mon[s][k]
                row[f"{s}:{k}"] = "" if v is None else f"{v:.4f}"
        with open(log_path, "a", newline="") as f:
            csv.DictWriter(f, fields).writerow(row)
        if writer:
            writer.add_scalar("train/loss", tot / n, epoch)
            writer.add_scalar("train/acc", acc / n, epoch)
            for s in sets:
                for k in mon_keys:
                    if mon[s][k] is not None:
                        writer.add_scalar(f"heldout_{s}/{k}", mon[s][k], epoch)
            writer.flush()
        _save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch,
                         numpy_rng=rng.bit_generator.state, torch_rng=torch.get_rng_state())
        say(f"epoch {epoch}/{t['epochs']} loss {tot / n:.4f} acc {acc / n:.4f} oe {tot_oe / n:.4f} "
            f"{secs:.0f} s ({1000 * secs / n:.0f} ms/step) | " + " ".join(
                f"{s}: upright->not {mon[s]['stored_called_nonupright']:.3f} exact {mon[s]['exact_state']:.3f}"
                for s in sets))
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < t["epochs"]:
            break
    if writer:
        writer.close()
    return ckpt_path


def load_trained(run) -> tuple[torch.nn.Module, dict]:
    run = Path(run)
    cfg = load_config(run / "config.yaml")
    model = build_model(cfg)
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(ck["model"])
    return model.eval(), cfg | {"_epoch": ck["epoch"]}


# ---------------------------------------------------------------------------------------------------------- evaluation
def nonchest_inputs() -> dict[str, np.ndarray]:
    """Synthetic and real non-chest images (raw, not preprocessed) with fixed seeds."""
    rng = np.random.default_rng(12345)
    n = 256
    yy, xx = np.mgrid[:n, :n] / (n - 1)
    out = {f"uniform_noise_{i}": rng.random((n, n)) for i in range(3)}
    for sig in (2, 8, 32):
        out[f"smooth_field_sigma{sig}"] = ndimage.gaussian_filter(rng.normal(size=(n, n)), sig, mode="wrap")
    out |= {"gradient_horizontal": xx, "gradient_vertical": yy, "gradient_diagonal": xx + yy,
            "gradient_radial": np.hypot(xx - 0.5, yy - 0.5), "constant": np.full((n, n), 0.5),
            "checkerboard": ((np.mgrid[:n, :n] // 32).sum(0) % 2).astype(float)}
    try:
        import skimage.data as skd

        for name in ("camera", "coins", "astronaut", "moon", "text"):
            try:
                out[f"photo_{name}"] = G.to_gray(getattr(skd, name)())
            except Exception:
                pass
    except ImportError:
        pass
    try:
        from pydicom.data import get_testdata_file

        out["RG3_UNCR_extremity_CR"] = read_image(get_testdata_file("RG3_UNCR.dcm"))
    except Exception:
        pass
    return out


def evaluate(run, write: bool = True, log=print) -> dict:
    """Every held-out film of each set in all 16 states through the full pipeline (apply -> preprocess -> model).

    Writes run/evaluation.json: per set the share of stored films called anything but upright, of mirrored copies
    recognised as mirrored, of rotated copies with the right rotation, of inverted copies recognised as inverted, the
    exact-state accuracy and the 16x16 confusion (rows true, columns predicted, order of STATES), and the softmax
    maximum on non-chest inputs.
    """
    torch.set_num_threads(1)
    run = Path(run)
    model, cfg = load_trained(run)
    size = cfg["input_size"]
    t0 = time.time()
    per_set: dict[str, list] = {}
    for s, p in heldout_sources(cfg):
        img = read_image(p)
        x = np.stack([G.preprocess(G.apply(st, img), size) for st in STATES])
        per_set.setdefault(s, []).append(predict(model, x))
    sets = {}
    all_true, all_p = [], []
    for s, ps in per_set.items():
        probs = np.concatenate(ps)
        true = np.tile(np.arange(N_STATES), len(ps))
        sets[s] = state_metrics(true, probs)
        all_true.append(true), all_p.append(probs)
        m = sets[s]
        log(f"{s:12s} films {m['n_films']:4d}  stored->not upright {m['stored_called_nonupright']:.4f}  mirrored "
            f"{m['mirrored_recognised']:.4f}  rotation {m['rotated_right_rotation']:.4f}  inverted "
            f"{m['inverted_recognised']:.4f}  exact {m['exact_state']:.4f}")
    sets["all"] = state_metrics(np.concatenate(all_true), np.concatenate(all_p))
    nonchest = {}
    for name, img in nonchest_inputs().items():
        pr = predict(model, np.stack([G.preprocess(G.apply(st, img), size) for st in STATES]))
        nonchest[name] = {"max_prob": float(pr.max(1).max()), "median_max_prob": float(np.median(pr.max(1))),
                          "argmax_at_max": G.STATE_NAMES[int(pr.max(0).argmax())]}
        log(f"non-chest {name:28s} max softmax over its 16 states {nonchest[name]['max_prob']:.3f}")
    res = {"epoch": cfg["_epoch"], "states": list(G.STATE_NAMES), "sets": sets, "nonchest": nonchest,
           "seconds": round(time.time() - t0, 1)}
    if write:
        with open(run / "evaluation.json", "w") as f:
            json.dump(res, f, indent=1)
    return res


# -------------------------------------------------------------------------------------------------------------- export
def export(run, out=None) -> Path:
    """Weights as safetensors (no pickle) + a JSON card: recipe, data, held-out results, SHA-256 of the weights."""
    from safetensors.torch import save_file

    run = Path(run)
    out = Path(out) if out else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    model, cfg = load_trained(run)
    ev_path = run / "evaluation.json"
    ev = json.loads(ev_path.read_text()) if ev_path.exists() else None
    if ev is None or ev.get("epoch") != cfg["_epoch"]:
        ev = evaluate(run)
    weights = out / "orientation.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"format": "pt"})
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    z = np.load(run / "cache.npz", allow_pickle=False)
    train_counts = {s: int((z["train_set"] == s).sum()) for s in dict.fromkeys(z["train_set"].tolist())}
    held_counts = {s: int((z["heldout_set"] == s).sum()) for s in dict.fromkeys(z["heldout_set"].tolist())}
    recipe = {k: v for k, v in cfg.items() if not k.startswith("_")}
    card = {
        "name": "orientation", "task": "orientation state of a frontal chest radiograph (16 classes)",
        "weights": weights.name, "sha256": sha, "epoch": cfg["_epoch"],
        "classes": list(G.STATE_NAMES),
        "class_definition": "index = 8*inverted + 4*mirrored + k; stored = invert?(rot90(fliplr?(upright), k)); "
                            "see lungseg/inference/orientation.py",
        "input": {"shape": [1, 1, cfg["input_size"], cfg["input_size"]],
                  "preprocessing": "gray; pad to square with the median border value (centred); Gaussian-prefiltered "
                                   "linear resize; 1st-99th percentile window to [0, 1]"},
        "output": "logits (N, 16); softmax gives the state probabilities; refuse to correct when the max is low",
        "recipe": recipe,
        "data": {"train": recipe["data"]["train"], "train_counts": train_counts,
                 "dropped_near_copies_of_heldout": z["dropped_name"].tolist(),
                 "heldout": recipe["data"]["heldout"], "heldout_counts": held_counts},
        "heldout_results": {s: {k: v for k, v in m.items() if k != "confusion"} for s, m in ev["sets"].items()},
        "nonchest_max_prob": {k: v["max_prob"] for k, v in ev["nonchest"].items()},
        "versions": {"torch": torch.__version__, "monai": __import__("monai").__version__},
    }
    (out / "orientation.json").write_text(json.dumps(card, indent=1))
    return weights


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lungseg.training.orientation", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["train", "evaluate", "export"])
    ap.add_argument("--run", required=True, help="run folder (resumed when it holds checkpoint.pt)")
    ap.add_argument("--config", default=None, help=f"recipe for a new run (default {DEFAULT_CONFIG})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. training.epochs=2")
    ap.add_argument("--out", default=None, help="export folder (default RUN/export)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.command == "train":
        train(a.run, a.config, a.set)
    elif a.command == "evaluate":
        evaluate(a.run)
    else:
        print(export(a.run, a.out))


if __name__ == "__main__":
    main()
