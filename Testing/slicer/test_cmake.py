"""The module's CMakeLists.txt lists every file it must install: slicerMacroBuildScriptedModule installs only the
scripts and resources it is given, so a file missing from the lists is missing from the extension package."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

from conftest import require_or_skip

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "LungSegExtension" / "LungSeg"
CORE = REPO / "LungSegCore"
CMAKELISTS = MODULE / "CMakeLists.txt"


def cmake_lists() -> dict[str, list[str]]:
    """The set(NAME item...) lists of the module's CMakeLists.txt, with ${MODULE_NAME} expanded."""
    text = re.sub(r"#.*", "", CMAKELISTS.read_text())
    lists = {name: body.split() for name, body in re.findall(r"\bset\(\s*(\w+)\s+([^)]*)\)", text)}
    module_name = lists["MODULE_NAME"][0]
    return {name: [item.replace("${MODULE_NAME}", module_name) for item in items] for name, items in lists.items()}


def files_under(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    }


def test_every_module_file_is_listed():
    lists = cmake_lists()
    listed = lists["MODULE_PYTHON_SCRIPTS"] + lists["MODULE_PYTHON_RESOURCES"]
    assert len(listed) == len(set(listed)), "listed twice"
    assert set(listed) == files_under(MODULE) - {"CMakeLists.txt"}
    assert all(item.endswith(".py") for item in lists["MODULE_PYTHON_SCRIPTS"])


def test_every_core_package_file_is_listed():
    """The lungseg package ships with the module: its modules and the package data of its pyproject.toml."""
    lists = cmake_lists()
    # [tool.setuptools.package-data] lungseg = [...] (read without tomllib, which Python 3.10 lacks)
    table = re.search(
        r"\[tool\.setuptools\.package-data\]\s*lungseg\s*=\s*\[(.*?)\]", (CORE / "pyproject.toml").read_text(), re.S
    )
    patterns = re.findall(r'"([^"]+)"', table.group(1))
    assert "models/shipped/*.safetensors" in patterns
    assert "models/shipped/*.onnx" in patterns  # the graphs that ONNX Runtime runs in Slicer
    shipped = {
        f"lungseg/{f}"
        for f in files_under(CORE / "lungseg")
        if f.endswith(".py") or any(fnmatch.fnmatch(f, pattern) for pattern in patterns)
    }
    assert set(lists["LUNGSEG_CORE_SCRIPTS"]) == {f for f in shipped if f.endswith(".py")}
    assert set(lists["LUNGSEG_CORE_RESOURCES"]) == {f for f in shipped if not f.endswith(".py")}
    assert any(f.endswith(".onnx") for f in lists["LUNGSEG_CORE_RESOURCES"]), "the ONNX graphs must ship"


def test_slicer_macros_are_used():
    text = CMAKELISTS.read_text()
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}", text)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "add_subdirectory(LungSegExtension/LungSeg)" in (REPO / "CMakeLists.txt").read_text()


def test_cmake_reads_the_same_lists(tmp_path):
    """CMake itself parses the file (Slicer's macros replaced by ones that print their arguments)."""
    if shutil.which("cmake") is None:
        require_or_skip("cmake is not installed (scripts/setup.sh test installs it: Testing/requirements-slicer.txt)")
    script = tmp_path / "check.cmake"
    script.write_text(f"""
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${{ARGN}})
  message(STATUS "module ${{MY_NAME}}|${{MY_SCRIPTS}}|${{MY_RESOURCES}}")
endmacro()
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES"
                        ${{ARGN}})
  foreach(file ${{MY_SCRIPTS}} ${{MY_RESOURCES}})
    if(NOT EXISTS "${{MY_SOURCE_DIR}}/${{file}}")
      message(FATAL_ERROR "missing ${{file}}")
    endif()
  endforeach()
  message(STATUS "core ${{MY_TARGET_NAME}}|${{MY_SCRIPTS}}|${{MY_RESOURCES}}")
endmacro()
macro(slicer_add_python_unittest)
  message(STATUS "unittest ${{ARGN}}")
endmacro()
set(BUILD_TESTING ON)
set(CMAKE_CURRENT_SOURCE_DIR "{MODULE.as_posix()}")
include("{CMAKELISTS.as_posix()}")
""")
    result = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    lists = cmake_lists()
    module = re.search(r"module LungSeg\|(.*)\|(.*)", out)
    assert module.group(1).split(";") == lists["MODULE_PYTHON_SCRIPTS"]
    assert module.group(2).split(";") == lists["MODULE_PYTHON_RESOURCES"]
    core = re.search(r"core LungSegCore\|(.*)\|(.*)", out)
    assert core.group(1).split(";") == lists["LUNGSEG_CORE_SCRIPTS"]
    assert core.group(2).split(";") == lists["LUNGSEG_CORE_RESOURCES"]
    assert "unittest SCRIPT;LungSeg.py" in out
