"""Only here to put `kvbench-lm-eval.pth` at the root of site-packages (pyproject.toml holds the rest):
it registers kvbench's lm-eval model types with stock lm-eval, which scans no entry points."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "kvbench-lm-eval.pth"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]

    def get_output_mapping(self) -> dict[str, str]:
        return {**super().get_output_mapping(), str(Path(self.build_lib) / PTH): PTH}


setup(cmdclass={"build_py": BuildWithPth})
