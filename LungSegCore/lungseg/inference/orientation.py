"""How a stored radiograph relates to the upright film: 16 states (quarter turns x mirroring x intensity inversion).

"Upright" is the standard display of a frontal chest film: apices at the top, the patient's right on the viewer's
left (the heart on the viewer's right), air dark. A stored image is `apply(state, upright)`, which mirrors
(`np.fliplr`) first, then turns by `k` quarter turns counterclockwise as displayed (`np.rot90(x, k)`), then inverts the
intensities. Arrays are (..., rows, columns): the last two axes are the image, so one call moves a (3, S, S) stack of
probabilities as well as a labelmap. Label values are kept: a right-lung label stays the patient's right lung, only
its place on the grid changes. States are indexed `8 * inverted + 4 * mirrored + k`; index 0 is upright.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class State:
    k: int = 0  # counterclockwise quarter turns, applied after the mirroring
    mirrored: bool = False
    inverted: bool = False

    @property
    def index(self) -> int:
        return 8 * int(self.inverted) + 4 * int(self.mirrored) + self.k

    @property
    def upright(self) -> bool:
        return self == UPRIGHT

    @property
    def turned(self) -> bool:
        """Rows and columns swap places between the stored image and the upright film."""
        return self.k % 2 == 1

    @property
    def name(self) -> str:
        parts = [f"rotated {90 * self.k}"] * bool(self.k) + ["mirrored"] * bool(self.mirrored)
        parts += ["inverted"] * bool(self.inverted)
        return " + ".join(parts) or "upright"

    def without(self, mirrored: bool = False, turns: bool = False, inversion: bool = False) -> State:
        """This state with the named parts dropped (what is left once a correction is turned off)."""
        return State(0 if turns else self.k, self.mirrored and not mirrored, self.inverted and not inversion)


@dataclass(frozen=True)
class Corrections:
    """What LungSeg may correct when the pixels show it (each can be turned off)."""

    turns: bool = True
    inversion: bool = True
    mirroring: bool = True

    @classmethod
    def parse(cls, text: str) -> Corrections:
        """From a comma-separated list such as "turns,inversion", or "none"."""
        names = {n.strip() for n in text.split(",") if n.strip()} - {"none"}
        unknown = names - {"turns", "inversion", "mirroring"}
        if unknown:
            raise ValueError(
                f"unknown correction(s) {', '.join(sorted(unknown))}; use turns, inversion, mirroring or none"
            )
        return cls("turns" in names, "inversion" in names, "mirroring" in names)


ALL_CORRECTIONS = Corrections()

STATES: tuple[State, ...] = tuple(State(k, bool(m), bool(i)) for i in (0, 1) for m in (0, 1) for k in range(4))
UPRIGHT = State()


def apply_geometry(state: State, array: np.ndarray) -> np.ndarray:
    """Mirror, then turn, over the last two axes (no intensity change)."""
    moved = np.asarray(array)
    if state.mirrored:
        moved = moved[..., ::-1]
    return np.ascontiguousarray(np.rot90(moved, state.k, axes=(-2, -1)))


def undo_geometry(state: State, array: np.ndarray) -> np.ndarray:
    """The inverse of `apply_geometry`: turn back, then mirror back."""
    moved = np.rot90(np.asarray(array), -state.k, axes=(-2, -1))
    if state.mirrored:
        moved = moved[..., ::-1]
    return np.ascontiguousarray(moved)


def apply_to_input(state: State, image: np.ndarray) -> np.ndarray:
    """A model input (values in [0, 1], after `preprocess.model_input`) as the film stored in `state` would give it:
    the percentile window commutes with inversion, so an inverted film's input is 1 - input."""
    moved = apply_geometry(state, image)
    return 1.0 - moved if state.inverted else moved


def undo_on_input(state: State, image: np.ndarray) -> np.ndarray:
    """The upright film's model input from a stored film's (the inverse of `apply_to_input`)."""
    image = 1.0 - np.asarray(image) if state.inverted else image
    return undo_geometry(state, image)


def upright_shape(state: State, shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of the upright film of a stored image of `shape`."""
    return (shape[1], shape[0]) if state.turned else tuple(shape)
