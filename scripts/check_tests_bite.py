#!/usr/bin/env python3
# size: the BREAKAGES table is most of the file (one entry per breakage, with its tests)
"""Do the tests bite? Re-apply each breakage of the test audit and of the Slicer reviews to a copy of the code and
expect the tests named for it to FAIL.

LungSegCore/, Testing/, LungSegExtension/ and CMakeLists.txt are copied once to a temporary folder (a snapshot,
so that every run sees the same code while others edit the tree). For each breakage, a copy of the snapshot gets
the breakage (a string replacement located by a code snippet, never by a line number: the snippet must occur
exactly once, and the result must compile), and the named tests run against that copy (PYTHONPATH at the copy's
LungSegCore, pytest run from the copy with -p no:cacheprovider; a guard plugin stops the run if `lungseg` is
imported from anywhere else, e.g. the editable install). First the same tests run on an unbroken copy: they
must pass there, or a failure under the breakage would prove nothing. A failure by ImportError or SyntaxError
does not count as a bite.

    .venv/bin/python scripts/check_tests_bite.py            # every breakage
    .venv/bin/python scripts/check_tests_bite.py T3 T5      # some of them
    .venv/bin/python scripts/check_tests_bite.py --list
    .venv/bin/python scripts/check_tests_bite.py --snippets  # only: each snippet occurs once, the result compiles

Exit status 0 when every breakage makes each of its tests fail; 1 when a breakage survives (a test still passes
or skips), a snippet no longer matches the code (relocate it), or a baseline test does not pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("LungSegCore", "Testing", "LungSegExtension", "CMakeLists.txt")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", "build")
SHARED_DATA = Path(os.environ.get("LUNGSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclass
class Edit:
    path: str  # relative to the repository root
    old: str  # a code snippet that occurs exactly once in that file
    new: str


@dataclass
class Breakage:
    id: str
    what: str
    edits: list[Edit]
    tests: list[str]  # pytest node ids, relative to the repository root; each must fail
    notes: str = ""
    extra: dict = field(default_factory=dict)


BREAKAGES: list[Breakage] = [
    Breakage(
        "T1",
        "the Slicer module inverts on a MONOCHROME1 header alone (the double inversion of volumes that "
        "Slicer's GDCM reader already inverted)",
        [
            Edit(
                "LungSegExtension/LungSeg/LungSegLib/SegmentationLogic.py",
                "        invert = inverted_against_file(radiograph.pixels, path) if dicom else None\n",
                '        invert = (photometric == "MONOCHROME1") if dicom else None\n',
            )
        ],
        [
            "Testing/slicer/test_logic.py::test_monochrome1_through_the_dicom_module_is_not_inverted_twice",
            "Testing/slicer/test_logic.py::test_same_answer_in_the_dicom_module_as_a_plain_file_and_in_the_batch",
        ],
    ),
    Breakage(
        "T2",
        "sharding disabled: every shard takes every input",
        [Edit("LungSegCore/lungseg/batch/records.py", "    return digest % count == index - 1\n", "    return True\n")],
        [
            "Testing/core/test_batch.py::test_shards_cover_inputs_without_overlap_and_lists_of_paths",
            "Testing/core/test_batch.py::test_in_shard_puts_every_path_in_exactly_one_shard",
        ],
    ),
    Breakage(
        "T3",
        "resolve_model ignores --definition (the default model always)",
        [
            Edit(
                "LungSegCore/lungseg/models/cards.py",
                "    return model if model else best_model(definition or DEFAULT_DEFINITION)\n",
                "    return model if model else DEFAULT_MODEL\n",
            )
        ],
        [
            "Testing/core/test_cli.py::test_definition_picks_the_best_model_of_that_definition",
            "Testing/core/test_cli.py::test_definition_without_a_model_is_a_clear_error",
        ],
    ),
    Breakage(
        "T4",
        "export never loads the trained weights (a randomly initialised network is exported and measured)",
        [
            Edit(
                "LungSegCore/lungseg/training/export.py",
                '    model.load_state_dict(state["model"])\n',
                "    pass  # breakage: the trained weights are never loaded\n",
            )
        ],
        ["Testing/core/test_training.py::test_export_writes_safetensors_and_a_measured_card"],
    ),
    Breakage(
        "T5",
        "evaluate scores only the ignored pixels (ignore=~ignore)",
        [
            Edit(
                "LungSegCore/lungseg/evaluation/evaluate.py",
                "regions=scored, ignore=ignore)",
                "regions=scored, ignore=None if ignore is None else ~ignore)",
            )
        ],
        [
            "Testing/core/test_definitions.py::test_evaluate_honours_v7_ignore_masks",
            "Testing/core/test_definitions.py::test_ignore_mask_leaves_out_exactly_its_pixels",
        ],
    ),
    Breakage(
        "T6",
        "the command line no longer calls keep_freed_memory()",
        [
            Edit(
                "LungSegCore/lungseg/cli.py",
                "    keep_freed_memory()  # this process is ours alone",
                "    pass  # breakage: keep_freed_memory() removed; this process is ours alone",
            )
        ],
        ["Testing/core/test_batch.py::test_command_line_keeps_freed_memory_for_the_next_forward_pass"],
    ),
    # ---- T8 (core): untested surface that is tested now
    Breakage(
        "T8a",
        "write_float_map writes the components as rows (no channels-last move)",
        [
            Edit(
                "LungSegCore/lungseg/io/radiograph.py",
                "    array = np.moveaxis(values, 0, -1) if vector else values\n",
                "    array = values.reshape(values.shape[1], values.shape[2], -1) if vector else values\n",
            )
        ],
        ["Testing/core/test_io.py::test_float_maps_are_written_on_the_reference_grid"],
    ),
    Breakage(
        "T8b",
        "inference uses UNet++'s shallowest deep-supervision head instead of the full-depth one",
        [
            Edit(
                "LungSegCore/lungseg/nets/networks.py",
                "    return out[-1] if isinstance(out, (list, tuple)) else out\n",
                "    return out[0] if isinstance(out, (list, tuple)) else out\n",
            )
        ],
        ["Testing/core/test_networks.py::test_unetpp_deep_supervision_gives_the_full_depth_output_last"],
    ),
    # ---- the second Slicer review (Windows and macOS batch, crashes, a folder named like a file)
    Breakage(
        "N1a",
        "the batch starts its helpers with fork everywhere (Windows has no fork: nothing is segmented)",
        [
            Edit(
                "LungSegCore/lungseg/batch/workers.py",
                '        return "fork" if sys.platform.startswith("linux") else "spawn"\n',
                '        return "fork"\n',
            )
        ],
        [
            "Testing/core/test_batch.py::test_batch_runs_where_only_spawn_exists",
            "Testing/core/test_batch.py::test_start_method_follows_the_platform_and_can_be_forced",
        ],
    ),
    Breakage(
        "N1b",
        "a spawned helper never notices that its batch process died (it waits for work forever)",
        [
            Edit(
                "LungSegCore/lungseg/batch/workers.py",
                "    multiprocessing.parent_process().join()\n",
                "    threading.Event().wait()\n",
            )
        ],
        ["Testing/core/test_batch.py::test_killed_run_resumes_without_loss_or_partial_files[spawn]"],
    ),
    Breakage(
        "N2",
        "an unexpected error leaves with status 1, the status of 'some inputs failed'",
        [
            Edit(
                "LungSegCore/lungseg/cli.py",
                '    except Exception as exc:  # a bug, or the machine (memory): not "some inputs failed" (1)\n',
                "    except ArithmeticError as exc:  # breakage: other errors escape with status 1\n",
            )
        ],
        ["Testing/core/test_batch.py::test_a_crash_has_its_own_exit_status_and_keeps_its_traceback"],
    ),
    Breakage(
        "F1",
        "a folder named like an image file (study.dcm/) is taken for a file",
        [
            Edit(
                "LungSegCore/lungseg/io/files.py",
                "        elif item.is_dir():  # a folder named like a file",
                "        elif item.is_dir() and suffix_of(item) not in IMAGE_SUFFIXES:  # a folder named like a file",
            )
        ],
        ["Testing/core/test_batch.py::test_a_folder_named_like_a_file_is_a_folder"],
    ),
    Breakage(
        "N2p",
        "the panel takes any exit 0 or 1 of the batch child for a finished run (a crash says '0 of 0 segmented')",
        [
            Edit(
                "LungSegExtension/LungSeg/LungSegLib/BatchPanel.py",
                "        elif batch.ranToEnd():  # all segmented, or some inputs failed: results.csv says which",
                "        elif batch.returnCode in (0, 1):",
            )
        ],
        ["Testing/slicer/test_widget.py::test_batch_child_that_crashes_is_reported_as_a_failure[traceback]"],
    ),
    Breakage(
        "N2q",
        "the panel trusts an older run's results.csv after a crash with status 1",
        [
            Edit(
                "LungSegExtension/LungSeg/LungSegLib/BatchProcess.py",
                "        return self.returnCode == 1 and stamp is not None and stamp != self._tableBefore",
                "        return self.returnCode == 1 and stamp is not None",
            )
        ],
        [
            "Testing/slicer/test_widget.py::test_batch_child_that_crashes_is_reported_as_a_failure"
            "[traceback-after-an-earlier-run]"
        ],
    ),
    Breakage(
        "N2r",
        "a batch child killed by a signal is reported without the signal",
        [
            Edit(
                "LungSegExtension/LungSeg/LungSegLib/BatchProcess.py",
                '            return f"killed by {name}" + (f"; last output: {last}" if last else "")',
                "            return last",
            )
        ],
        ["Testing/slicer/test_widget.py::test_batch_child_that_crashes_is_reported_as_a_failure[killed]"],
    ),
    Breakage(
        "N3",
        "the demo CR is registered in Sample Data without loadFileType (Slicer 5.8+ loads no volume)",
        [Edit("LungSegExtension/LungSeg/LungSeg.py", '        loadFileType="VolumeFile",\n', "")],
        [
            "Testing/slicer/test_install.py::test_demo_cr_in_sample_data_loads_as_a_volume[5.8]",
            "Testing/slicer/test_install.py::test_demo_cr_in_sample_data_loads_as_a_volume[5.12]",
        ],
    ),
    Breakage(
        "N5",
        "the batch folder counts only on directoryChanged (the folder the dialog opens in is refused)",
        [
            Edit(
                "LungSegExtension/LungSeg/LungSegLib/BatchPanel.py",
                "        self.ui.batchInputDirectoryButton.directorySelected.connect(",
                "        self.ui.batchInputDirectoryButton.directoryChanged.connect(",
            )
        ],
        ["Testing/slicer/test_widget.py::test_batch_accepts_the_folder_the_dialog_opens_in"],
    ),
    Breakage(
        "N6",
        "Cancel on Windows starts taskkill with a console window",
        [
            Edit(
                "LungSegExtension/LungSeg/LungSegLib/BatchProcess.py",
                '                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),\n',
                "",
            )
        ],
        ["Testing/slicer/test_logic.py::test_cancel_on_windows_runs_taskkill_without_a_console_window"],
    ),
    Breakage(
        "N7",
        "the export dialog proposes the node name as it is ('1: Unnamed Series-lungs')",
        [
            Edit(
                "LungSegExtension/LungSeg/LungSegLib/Widget.py",
                '        dialog.selectFile(f"{fileNameFor(reference.GetName())}-lungs")',
                '        dialog.selectFile(f"{reference.GetName()}-lungs")',
            )
        ],
        ["Testing/slicer/test_widget.py::test_export_dialog_proposes_a_file_name_windows_accepts"],
    ),
    # ---- inference on ONNX Runtime
    Breakage(
        "O1",
        "the ONNX graphs are loaded without checking their SHA-256 against the card",
        [
            Edit(
                "LungSegCore/lungseg/models/cards.py",
                'open_session(verified(folder / graph["file"], graph["sha256"], card["name"]), device, threads)',
                'open_session(folder / graph["file"], device, threads)',
            )
        ],
        ["Testing/core/test_models.py::test_tampered_onnx_graphs_are_refused"],
    ),
    Breakage(
        "O2",
        "the inference path imports torch again",
        [
            Edit(
                "LungSegCore/lungseg/inference/segmenter.py",
                "import numpy as np\nfrom scipy import ndimage\n",
                "import numpy as np\nimport torch  # noqa: F401  (breakage)\nfrom scipy import ndimage\n",
            )
        ],
        [
            "Testing/core/test_without_torch.py::test_segment_writes_every_output_without_torch",
            "Testing/core/test_without_torch.py::test_evaluate_fit_qc_and_the_python_api_without_torch",
        ],
    ),
    Breakage(
        "R1",
        "a reader's death is reported as a dead pool, which the batch takes for a finisher's",
        [
            Edit(
                "LungSegCore/lungseg/batch/reader.py",
                '                raise ReaderDied(held, "a reader process ended abruptly") from exc\n',
                "                raise\n",
            )
        ],
        ["Testing/core/test_batch.py::test_an_input_that_crashes_its_reader_fails_and_the_rest_are_read_again"],
    ),
    Breakage(
        "O3",
        "issue 34: scores shrunk to a small film by a float resize, not torch's 8-bit one (unet-512 on 256² films)",
        [
            Edit(
                "LungSegCore/lungseg/inference/postprocess.py",
                "        return resize_uint8(quantized, shape)\n",
                "        return resize(quantized, shape)\n",
            )
        ],
        ["Testing/core/test_models.py::test_scores_shrink_to_a_small_image_as_torchs_8_bit_resize_did"],
    ),
    Breakage(
        "S1",
        "issue 35: a corrected film's maps stay in the upright frame instead of going back onto the stored grid",
        [
            Edit(
                "LungSegCore/lungseg/inference/postprocess.py",
                "return None if array is None else reorient(apply_geometry(orientation, array), flips)",
                "return None if array is None else reorient(array, flips)",
            )
        ],
        [
            "Testing/core/test_orientation.py::test_corrected_films_segment_like_the_upright_film_on_their_own_grid",
            "Testing/slicer/test_logic.py::test_a_turned_film_is_segmented_upright_on_the_loaded_volume",
        ],
    ),
    Breakage(
        "S2",
        "issue 35: a film that looks mirrored is segmented by position, as before (Right and Left swapped, unflagged)",
        [
            Edit(
                "LungSegCore/lungseg/inference/orientation_classifier.py",
                "    seen = State(state.k, state.mirrored and sure, state.inverted)\n",
                "    seen = State(state.k, False, state.inverted)\n",
            )
        ],
        [
            "Testing/core/test_orientation.py::test_segment_corrects_each_state_unless_told_not_to",
            "Testing/core/test_batch.py::test_one_orientation_step_serves_segment_and_evaluate",
        ],
    ),
    Breakage(
        "S3",
        "issue 35: the mirror decision is read from the first pass, on the film still turned",
        [
            Edit(
                "LungSegCore/lungseg/inference/orientation_classifier.py",
                "probabilities_of(np.stack([undo_on_input(poses[i], images[i]) for i in moved]))",
                "probabilities_of(np.stack([images[i] for i in moved]))",
            )
        ],
        ["Testing/core/test_orientation.py::test_the_mirror_decision_is_made_on_the_film_turned_upright"],
    ),
    Breakage(
        "S4",
        "issue 35: a DICOM header's PatientOrientation no longer wins over the pixels",
        [
            Edit(
                "LungSegCore/lungseg/inference/orientation_classifier.py",
                "    if header:\n",
                "    if False:\n",
            )
        ],
        ["Testing/core/test_orientation.py::test_the_dicom_header_wins_and_a_disagreement_is_flagged"],
    ),
    Breakage(
        "P1",
        "the labelmap's window is resized with edges that do not fall on whole model pixels (Pillow then samples "
        "each output pixel a little differently from the whole resize)",
        [
            Edit(
                "LungSegCore/lungseg/inference/postprocess.py",
                "    step = out // math.gcd(size, out)\n",
                "    step = 1\n",
            )
        ],
        ["Testing/core/test_models.py::test_the_labelmap_resized_in_a_window_equals_the_whole_resize"],
    ),
    Breakage(
        "W1",
        "issue 34: the weights that a graph reads from the safetensors file beside it are not verified (a changed "
        "file would segment quietly with other weights)",
        [
            Edit(
                "LungSegCore/lungseg/models/cards.py",
                '        verified(folder / card["onnx"]["weights"], card["sha256"], card["name"])\n',
                "        pass\n",
            )
        ],
        ["Testing/core/test_models.py::test_the_weights_a_graph_reads_are_verified_too"],
    ),
    Breakage(
        "W2",
        "issue 34: the export folds constants, so the graph keeps its own (folded) copy of the weights and the model "
        "ships them twice",
        [
            Edit(
                "LungSegCore/lungseg/training/export_onnx.py",
                "            do_constant_folding=False,",
                "            do_constant_folding=True,",
            )
        ],
        ["Testing/core/test_training.py::test_export_writes_safetensors_and_a_measured_card"],
    ),
    Breakage(
        "W3",
        "issue 34: `lungseg export --from-model` reads an ensemble's val sets where a single network's recipe has "
        "them (it stopped with an internal error, KeyError 'data', for unet-full-extent)",
        [
            Edit(
                "LungSegCore/lungseg/training/export.py",
                '    recipe = card["recipe"].get("ensemble", [card["recipe"]])[0]',
                '    recipe = card["recipe"]',
            )
        ],
        ["Testing/core/test_training.py::test_two_runs_export_as_their_ensemble"],
    ),
]

WRONG_REASONS = ("ImportError", "ModuleNotFoundError", "SyntaxError", "IndentationError")
GUARD = '''"""Loaded with -p: stop the run unless `lungseg` comes from this copy (not the editable install)."""
import os
from pathlib import Path


def pytest_sessionstart(session):
    import lungseg

    expected = Path(os.environ["BITE_COPY"]).resolve()
    actual = Path(lungseg.__file__).resolve()
    if expected not in actual.parents:
        raise RuntimeError(f"lungseg imported from {actual}, not from the copy {expected}")
'''


def snapshot(root: Path) -> Path:
    """One copy of the working tree, taken once: the baseline and every breakage start from the same code, even
    while someone edits the tree."""
    copy = root / "snapshot"
    copy.mkdir(parents=True)
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=IGNORED, symlinks=True)
        elif source.exists():
            shutil.copy2(source, copy / name)
    return copy


def make_copy(source: Path, root: Path) -> Path:
    copy = root / "repo"
    shutil.copytree(source, copy, symlinks=True)
    (root / "guard").mkdir()
    (root / "guard" / "bite_guard.py").write_text(GUARD)
    return copy


def broken_files(root: Path, edits: list[Edit]) -> dict[Path, str]:
    """The text of each file the edits touch, with the breakage applied (files under `root` are not written)."""
    texts: dict[Path, str] = {}
    for edit in edits:
        path = root / edit.path
        text = texts[path] if path in texts else path.read_text(encoding="utf-8")
        count = text.count(edit.old)
        if count != 1:
            raise LookupError(
                f"{edit.path}: the snippet {edit.old.strip()!r} occurs {count} times (expected once); "
                "the code moved: relocate this breakage"
            )
        texts[path] = text.replace(edit.old, edit.new)
    for path, broken in texts.items():
        if path.suffix == ".py":
            compile(broken, str(path), "exec")  # a breakage that does not even compile would prove nothing
    return texts


def apply(copy: Path, edits: list[Edit]) -> None:
    for path, broken in broken_files(copy, edits).items():
        path.write_text(broken, encoding="utf-8")


def check_snippets(chosen: list[Breakage]) -> int:
    """--snippets: every breakage's snippets occur exactly once in this checkout and the broken code compiles."""
    problems = []
    for b in chosen:
        try:
            broken_files(REPO, b.edits)
        except (LookupError, SyntaxError) as exc:
            problems.append(f"{b.id}: {exc}")
    print("\n".join(problems) if problems else f"every snippet of {len(chosen)} breakages occurs once and compiles")
    return 1 if problems else 0


def run_tests(copy: Path, tests: list[str], report: Path) -> tuple[dict[str, str], dict[str, str], str]:
    """Outcome per node id ('passed', 'failed', 'skipped', 'missing'), the first failure message per node id,
    and the tail of pytest's output."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(copy / "LungSegCore"), str(copy.parent / "guard")]),
        BITE_COPY=str(copy),
        LUNGSEG_SHARED_DATA=str(SHARED_DATA),
        TQDM_DISABLE="1",
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("LUNGSEG_REQUIRE_DATA", None)  # a skip must show as a skip here: it is not a bite
    check = subprocess.run(
        [sys.executable, "-c", "import lungseg; print(lungseg.__file__)"],
        cwd=copy / "Testing",
        env=env,
        capture_output=True,
        text=True,
    )
    if not Path(check.stdout.strip()).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"lungseg resolves to {check.stdout.strip() or check.stderr} instead of the copy")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "bite_guard",
            "-q",
            f"--junitxml={report}",
            *tests,
        ],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    seen: dict[str, list[str]] = {test: [] for test in tests}
    messages: dict[str, str] = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            node = f"{case.get('classname', '').split('.')[-1]}.py::{case.get('name')}"
            children = {child.tag for child in case}
            problem = next((child for child in case if child.tag in ("failure", "error")), None)
            outcome = "failed" if children & {"failure", "error"} else "skipped" if "skipped" in children else "passed"
            for test in tests:
                key = short(test)
                if node == key or node.startswith(key + "["):  # a parametrized test: each of its cases
                    seen[test].append(outcome)
                    if problem is not None and test not in messages:
                        messages[test] = " ".join((problem.get("message") or problem.text or "").split())
    # a test bites when any of its cases fails; it passes only when no case failed and one passed
    outcomes = {
        test: next((o for o in ("failed", "passed", "skipped") if o in found), "missing")
        for test, found in seen.items()
    }
    return outcomes, messages, (result.stdout + result.stderr)[-3000:]


def short(test: str) -> str:
    return test.split("/")[-1]


def check_baseline(source: Path, tmp: Path, chosen: list[Breakage]) -> list[str]:
    """The chosen breakages' tests on an unbroken copy: each must pass, or its failure under a breakage proves
    nothing. The problems found."""
    problems = []
    copy = make_copy(source, tmp / "baseline")
    tests = [t for b in chosen for t in b.tests]
    t0 = time.perf_counter()
    outcomes, _, tail = run_tests(copy, tests, tmp / "baseline.xml")
    bad = {t: o for t, o in outcomes.items() if o != "passed"}
    print(
        f"baseline (unbroken copy): {len(tests) - len(bad)} of {len(tests)} passed in {time.perf_counter() - t0:.0f} s"
    )
    for test, outcome in bad.items():
        problems.append(f"baseline: {short(test)} {outcome} without any breakage")
    if bad:
        print(tail)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="*", help="breakages to check (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breakages and their tests")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unbroken copy")
    parser.add_argument("--snippets", action="store_true", help="only check that the snippets match (no tests run)")
    args = parser.parse_args()
    chosen = [b for b in BREAKAGES if not args.ids or b.id in args.ids]
    if args.snippets:
        return check_snippets(chosen)
    if args.list or not chosen:
        for b in BREAKAGES:
            print(f"{b.id}: {b.what}\n    " + "\n    ".join(b.tests))
        return 0 if chosen or args.list else 2

    problems = []
    with tempfile.TemporaryDirectory(prefix="lungseg-bite-") as tmp:
        tmp = Path(tmp)
        source = snapshot(tmp)
        if not args.no_baseline:
            problems += check_baseline(source, tmp, chosen)
        for b in chosen:
            t0 = time.perf_counter()
            copy = make_copy(source, tmp / b.id)
            try:
                apply(copy, b.edits)
            except (LookupError, SyntaxError) as exc:
                problems.append(f"{b.id}: {exc}")
                print(f"{b.id}: NOT APPLIED: {exc}")
                continue
            outcomes, messages, tail = run_tests(copy, b.tests, tmp / f"{b.id}.xml")
            for test in outcomes:  # failing to import proves nothing about the test's assertions
                if outcomes[test] == "failed" and messages.get(test, "").startswith(WRONG_REASONS):
                    outcomes[test] = "failed to import"
            survived = {t: o for t, o in outcomes.items() if o != "failed"}
            verdict = "bites" if not survived else "SURVIVES"
            print(f"{b.id}: {b.what}: {verdict} ({time.perf_counter() - t0:.0f} s)")
            for test, outcome in outcomes.items():
                print(f"    {outcome.upper():8} {short(test)}")
                if test in messages:
                    print(f"             {messages[test][:220]}")
            for test, outcome in survived.items():
                problems.append(f"{b.id}: {short(test)} {outcome} on the broken code")
            if survived:
                print(tail)
            shutil.rmtree(copy, ignore_errors=True)
    if problems:
        print("\nbreakages that survive or could not be checked:\n  " + "\n  ".join(problems))
        return 1
    print(f"\nevery breakage ({', '.join(b.id for b in chosen)}) makes its tests fail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
