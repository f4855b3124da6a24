"""PNG plots of an ICL report (jaxssl.eval.icl): accuracy against k per model, and against model size per k.

Drawn on a bare matplotlib Figure (Agg canvas): no pyplot, no global backend state, no display needed. `path` may
be local or in a bucket.
"""
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxssl.eval import files


def _figure():
  fig = Figure(figsize=(6.4, 4.4), dpi=100)
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot()


def _baseline(ax, report: dict) -> None:
  ax.axhline(report['majority_baseline'], color='grey', linestyle='--', linewidth=1, label='majority label')


def _size(params: int) -> str:
  return f'{params / 1e9:.1f}B' if params >= 1e9 else f'{params / 1e6:.1f}M' if params >= 1e5 else f'{params:,}'


def accuracy_vs_shots(report: dict, path: str) -> None:
  """One line per model: accuracy at each k (evenly spaced, as the k are usually 0, 1, 2, 4, 8, ...)."""
  fig, ax = _figure()
  shots = report['shots']
  x = list(range(len(shots)))
  for name, m in report['models'].items():
    ax.plot(x, [m['accuracy'][str(k)] for k in shots], marker='o', label=f'{name} ({_size(m["params"])})')
  _baseline(ax, report)
  ax.set_xticks(x, [str(k) for k in shots])
  ax.set_xlabel('demonstrations in the prompt (k)')
  ax.set_ylabel('accuracy')
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f'{report["task"]}: accuracy vs shots ({report["scoring"]})')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  fig.tight_layout()
  files.write_figure(fig, path)


def accuracy_vs_size(report: dict, path: str) -> None:
  """One line per k (zero-, one-, few-shot): accuracy against parameter count (log scale), models by size."""
  fig, ax = _figure()
  models = sorted(report['models'].items(), key=lambda item: item[1]['params'])
  sizes = [m['params'] for _, m in models]
  for k in report['shots']:
    name = {0: 'zero-shot', 1: 'one-shot'}.get(k, f'{k}-shot')
    ax.plot(sizes, [m['accuracy'][str(k)] for _, m in models], marker='o', label=name)
  _baseline(ax, report)
  ax.set_xscale('log')
  ax.minorticks_off()
  distinct = sorted(set(sizes))
  names = {s: ', '.join(n for n, m in models if m['params'] == s) for s in distinct}
  ax.set_xticks(distinct, [f'{_size(s)}\n{names[s]}' for s in distinct], fontsize='small')
  if len(distinct) == 1:  # one size: give the log axis some width around it
    ax.set_xlim(distinct[0] / 2, distinct[0] * 2)
  ax.set_xlabel('parameters')
  ax.set_ylabel('accuracy')
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f'{report["task"]}: accuracy vs model size ({report["scoring"]})')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  fig.tight_layout()
  files.write_figure(fig, path)
