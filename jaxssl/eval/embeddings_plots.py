"""PNG heatmaps of an embeddings report (jaxssl.eval.embeddings): contextual and static cosine similarity side by side.

Drawn on a bare matplotlib Figure (Agg canvas): no pyplot, no global backend state, no display needed.
"""
import warnings

import numpy as np
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Fonts with CJK glyphs, tried after the default one (matplotlib falls back per glyph); absent ones are skipped.
CJK_FONTS = ('Noto Sans CJK SC', 'Noto Sans CJK JP', 'Noto Sans SC', 'WenQuanYi Zen Hei', 'WenQuanYi Micro Hei',
             'AR PL UMing CN', 'SimHei', 'Microsoft YaHei', 'PingFang SC', 'Heiti SC', 'Arial Unicode MS')


def _families() -> list[str]:
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


def _panel(fig, ax, matrix, labels, title, families):
  image = ax.imshow(matrix, vmin=-1.0, vmax=1.0, cmap='RdBu_r')
  n = len(labels)
  ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize='small')
  ax.set_yticks(range(n), labels, fontsize='small', family=families)
  if n <= 16:  # the values themselves, while they fit in the cells
    for i in range(n):
      for j in range(n):
        ax.text(j, i, f'{matrix[i, j]:.2f}', ha='center', va='center', fontsize=6,
                color='white' if abs(matrix[i, j]) > 0.6 else 'black')
  ax.set_title(title, fontsize='medium')
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def heatmaps(report: dict, path: str) -> None:
  """Two panels, contextual then static; rows labelled 'i: snippet (label)' (the static panel: i), columns by i."""
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
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # "Glyph missing" where no CJK font is installed: boxes, still a valid plot
    fig.tight_layout()
    fig.savefig(path, bbox_inches='tight')  # long row labels: grow the canvas rather than clip them
