"""mkdocs hook: serve the benchmark's committed results (bench-results/*) with the site, so that the docs
show the same chart the README shows and link the raw results, without a copy in docs/. (The summary
tables, `*.md`, are included into pages by the snippets extension rather than served as pages.)"""
from pathlib import Path

from mkdocs.structure.files import File


def on_files(files, config):
    root = Path(config.config_file_path).parent
    for path in sorted((root / 'bench-results').iterdir()):
        if path.is_file() and path.suffix != '.md': files.append(File.generated(config, f'bench-results/{path.name}', abs_src_path=str(path)))
    return files
