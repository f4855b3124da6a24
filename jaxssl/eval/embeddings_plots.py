"""PNG heatmaps of an embeddings report (jaxssl.eval.embeddings): contextual and static cosine similarity side by side.

Drawn on a bare matplotlib Figure (Agg canvas): no pyplot, no global backend state, no display needed.
"""
import importlib.util
import os
import warnings

import numpy as np
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxssl.eval import files

# Fonts with CJK glyphs, tried after the default one (matplotlib falls back per glyph); absent ones are skipped.
# 'Noto Sans CJK TC' is the one requirements.txt installs (package cvttf-NotoSansCJK-Regular: Noto Sans CJK TC
# Regular, which covers simplified characters too); the others are what an OS may already have.
CJK_FONTS = ('Noto Sans CJK SC', 'Noto Sans CJK TC', 'Noto Sans CJK JP', 'Noto Sans SC', 'WenQuanYi Zen Hei',
             'WenQuanYi Micro Hei', 'AR PL UMing CN', 'SimHei', 'Microsoft YaHei', 'PingFang SC', 'Heiti SC',
             'Arial Unicode MS')
PACKAGED_CJK_FONT = ('cvttf_NotoSansCJK_Regular', 'NotoSansCJKtc-Regular.otf')  # (module, file in it)


def _register_packaged_cjk_font() -> None:
  """Adds the pip-installed CJK font to matplotlib's font list (a font inside a Python package is not on any
  path matplotlib scans). Idempotent; a missing package is fine (the labels then fall back, see _row_labels)."""
  module, filename = PACKAGED_CJK_FONT
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    return
  path = os.path.join(list(spec.submodule_search_locations)[0], filename)
  if os.path.exists(path) and path not in {f.fname for f in font_manager.fontManager.ttflist}:
    font_manager.fontManager.addfont(path)


def _families() -> list[str]:
  _register_packaged_cjk_font()
  available = {f.name for f in font_manager.fontManager.ttflist}
  return ['DejaVu Sans'] + [f for f in CJK_FONTS if f in available]


def _row_labels(report: dict, families: list[str]) -> tuple[list[str], str]:
  """('i: snippet (label)' per item, a note) -- without a CJK font, CJK text would draw as boxes: then the rows
  show 'i: (label)' only and the note points at results.json's snippets."""
  items = report['items']
  full = [f'{i}: {item["snippet"]}' for i, item in enumerate(items)]
  if len(families) > 1 or not any(ord(ch) >= 0x2E80 for text in full for ch in text):
    return full, ''
  short = [f'{i}: ' + (f'({item["label"]})' if item['label'] is not None else f'item {i}')
           for i, item in enumerate(items)]
  return short, '(no CJK font installed: sentences are in results.json, items[i].snippet)'


def color_limits(matrix: np.ndarray) -> tuple[float, float]:
  """(vmin, vmax) spanning the values shown: trained encoders put nearly every cosine in 0.8-1.0, where a fixed
  -1..1 scale is one flat colour. A constant matrix gets a band of 0.1 around its value, inside [-1, 1]."""
  lo, hi = float(np.min(matrix)), float(np.max(matrix))
  if hi - lo < 1e-6:  # kept inside [-1, 1], where cosines live
    lo, hi = max(-1.0, min(lo - 0.05, 0.9)), min(1.0, max(hi + 0.05, -0.9))
  return lo, hi


def _panel(fig, ax, matrix, labels, title, families):
  vmin, vmax = color_limits(matrix)
  image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap='viridis')
  n = len(labels)
  ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize='small')
  ax.set_yticks(range(n), labels, fontsize='small', family=families)
  if n <= 16:  # the values themselves, while they fit in the cells
    for i in range(n):
      for j in range(n):
        dark = (matrix[i, j] - vmin) / (vmax - vmin) < 0.6  # viridis is dark at its low end
        ax.text(j, i, f'{matrix[i, j]:.2f}', ha='center', va='center', fontsize=6,
                color='white' if dark else 'black')
  ax.set_title(title, fontsize='medium')
  bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  # The scale is fitted per panel, so say where it starts and ends: colours are not comparable across panels.
  bar.set_label(f'cosine, scale {vmin:.2f} to {vmax:.2f}', fontsize='small')


def heatmap_figure(report: dict) -> Figure:
  """Two panels, contextual then static; rows labelled 'i: snippet (label)' (the static panel: i), columns by i.

  Each panel's colour scale spans its own values (color_limits); its colourbar is labelled with that range."""
  families = _families()
  labels, note = _row_labels(report, families)
  n = len(labels)
  side = max(4.0, 0.45 * n + 1.5)
  fig = Figure(figsize=(2 * side + 4.5, side + 0.8), dpi=100)
  FigureCanvasAgg(fig)
  for k, kind in enumerate(('contextual', 'static')):
    ax = fig.add_subplot(1, 2, k + 1)
    s = report[kind]['summary']
    gap = '' if s is None or s['gap'] is None else f'\nwithin {s["within_label"]:.2f}, across ' \
        f'{s["across_label"]:.2f}, gap {s["gap"]:.2f}'
    layer = f'layer {report["layer"]}' if kind == 'contextual' else 'input embeddings'
    # The static panel sits right of the contextual one: its rows are the same items, so numbers suffice.
    rows = labels if k == 0 else [str(i) for i in range(n)]
    _panel(fig, ax, np.asarray(report[kind]['similarity']), rows, f'{kind} ({layer}){gap}', families)
  fig.suptitle(f'{report["set"]}: cosine similarity of the target ({report["model_kind"]}, '
               f'pooling={report["pooling"]})' + (f'\n{note}' if note else ''), fontsize='medium')
  return fig


def heatmaps(report: dict, path: str) -> None:
  """Writes heatmap_figure(report) as a PNG at `path` (local or in a bucket)."""
  fig = heatmap_figure(report)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # "Glyph missing" where no CJK font is installed: boxes, still a valid plot
    fig.tight_layout()
    files.write_figure(fig, path, bbox_inches='tight')  # long row labels: grow the canvas rather than clip them
