"""MkDocs hooks of the documentation site (mkdocs.yml `hooks:`; not a page: `exclude_docs` leaves it out).

- The benchmark plots stay where the benchmark harness writes them, next to their results
  (`benchmarks/results/<machine>/*.png`, `benchmarks/<study>/*.png`): `on_files` adds every PNG under `benchmarks/`
  to the site at the same path, so a page links them relative to `docs/` (`benchmarks/results/<machine>/decode.png`
  from `docs/benchmarks.md`, as `scripts/benchmarks/benchmark.py report --docs` writes them).
"""

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
PLOTS = "benchmarks"


def on_files(files, config):
    for path in sorted((ROOT / PLOTS).rglob("*.png")):
        uri = path.relative_to(ROOT).as_posix()
        if files.get_file_from_path(uri) is None:
            files.append(File(uri, src_dir=str(ROOT), dest_dir=config["site_dir"], use_directory_urls=False))
    return files
