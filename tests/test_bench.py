"""jaxssl.bench for every family (synthetic batches, --profile, --pipeline) and the FLOPs-per-token formulas
against XLA's own count of the compiled train step."""
import functools
import json
import os

import jax
import numpy as np
import pytest

from jaxssl import bench
from jaxssl import config as config_lib
from jaxssl import families
from jaxssl import mesh as mesh_lib
from jaxssl.train import state as state_lib
from jaxssl.train import step as step_lib

# Tiny but real: batch 8 (the 8 simulated devices), 32 tokens, a 300-piece vocabulary.
SMALL = ['--config.train.batch_size=8', '--config.data.seq_len=32', '--config.tokenizer.vocab_size=300']
TINY = {
    'bert': ('configs/bert.py:tiny', ['--config.data.max_predictions=5', '--config.model.num_layers=1']),
    'gpt': ('configs/gpt.py:llama_tiny', ['--config.model.num_layers=1']),
    'encdec': ('configs/encdec.py:tiny', ['--config.model.num_layers=1', '--config.model.num_decoder_layers=1']),
    'elmo': ('configs/elmo.py:tiny', ['--config.model.num_layers=1', '--config.model.lstm_size=64']),
}
STEP_KEYS = ('tokens_per_sec', 'step_time_s', 'compile_s', 'peak_memory_mb', 'flops_per_token', 'mfu')


def load(spec, overrides):
  config = config_lib.load_config(spec)
  assert not config_lib.parse_overrides(config, overrides)
  return config


@pytest.mark.parametrize('family', sorted(TINY))
def test_synthetic_batch_matches_batch_shapes(family):
  spec, extra = TINY[family]
  config = load(spec, SMALL + extra)
  fam = families.family_for(config.model)
  batch = fam.synthetic_batch(config, 300, 0)
  shapes = fam.batch_shapes(config)
  assert set(batch) == set(shapes)
  for k, (shape, dtype) in shapes.items():
    assert batch[k].shape == (8, *shape) and batch[k].dtype == dtype, k
  if 'segment_ids' in batch:  # packed rows of 2-4 documents, positions restarting at each
    for seg, pos in zip(batch['segment_ids'], batch['positions']):
      assert seg[0] == 1 and 2 <= seg.max() <= 4 and np.all(np.diff(seg) >= 0)
      assert np.all(pos[np.r_[True, np.diff(seg) > 0]] == 0)
  if 'source_mask' in batch:
    assert np.all(batch['target_input_ids'][:, 1:] * batch['target_mask'][:, 1:] ==
                  batch['target_ids'][:, :-1] * batch['target_mask'][:, 1:])


@pytest.mark.parametrize('family', sorted(TINY))
def test_bench_runs_every_family(family, tmp_path):
  spec, extra = TINY[family]
  profile = str(tmp_path / 'trace') if family == 'gpt' else ''  # one trace is enough
  row = bench.run(load(spec, SMALL + extra), steps=2, profile_dir=profile)
  json.dumps(row)
  assert row['family'] == family
  assert all(row[k] > 0 for k in STEP_KEYS), row
  assert np.isfinite(row['loss'])
  if profile:
    files = [f for _, _, names in os.walk(profile) for f in names]
    assert any(f.endswith(('.xplane.pb', '.trace.json.gz')) for f in files), files


def test_bench_pipeline_main(tmp_path, capsys):
  words = 'the cat sat on a mat while dogs ran far away from home and birds sang in trees at dawn'.split()
  rng = np.random.default_rng(0)
  docs = ['\n'.join(' '.join(rng.choice(words, 12)) for _ in range(6)) for _ in range(60)]
  (tmp_path / 'corpus.txt').write_text('\n\n'.join(docs) + '\n')
  spec, extra = TINY['gpt']
  bench.main(['--config', spec, '--pipeline', '--pipeline-batches', '3', '--steps', '1', *SMALL, *extra,
              '--config.tokenizer.vocab_size=40', f'--config.data.corpus={tmp_path / "corpus.txt"}',
              f'--config.data.data_dir={tmp_path / "data"}'])
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert row['pipeline_tokens_per_sec'] > 0 and row['pipeline_threads'] == 1
  assert row['pipeline_over_step'] > 0 and row['tokens_per_sec'] > 0 and row['family'] == 'gpt'


# Hidden 256, 128 tokens, vocab 1000: matmuls dominate, so the matmul-only formula should be within 10% of XLA's
# count of every op (norms, softmax, the optimizer update add a few percent). Layers unscanned: XLA counts a
# loop body once. ELMo's recurrence is a scan over time by design; see test_elmo_flops_formula_matches_xla.
FLOPS_CASES = {
    'bert': ('configs/bert.py:mini', ['--config.model.num_layers=2']),
    # factorised embeddings (ELECTRA): 64 wide, projected to 256
    'bert_factorised': ('configs/bert.py:mini', ['--config.model.num_layers=2', '--config.model.embedding_size=64']),
    'gpt': ('configs/gpt.py:mini', ['--config.model.num_layers=2', '--config.data.seq_len=128',
                                    '--config.data.max_predictions=128']),
    'llama': ('configs/gpt.py:llama_tiny', ['--config.model.hidden_size=256', '--config.model.intermediate_size=704']),
    'encdec': ('configs/encdec.py:tiny', ['--config.model.hidden_size=256', '--config.model.num_heads=4',
                                          '--config.model.intermediate_size=1024']),
}
FLOPS_COMMON = ['--config.train.batch_size=8', '--config.tokenizer.vocab_size=1000', '--config.data.seq_len=128']


def xla_flops_per_token(config) -> float:
  """XLA's FLOPs of the whole train step per token of the global batch.

  XLA's cost analysis of the lowered (unpartitioned) program: the compiled one is per device, where the replicated
  optimizer update would count once per device share of the batch; and lowering alone is seconds, not tens.
  """
  vocab = config.tokenizer.vocab_size
  fam = families.family_for(config.model)
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  setup = state_lib.setup_model(config.model, vocab, mesh, 0)
  tx, schedule = state_lib.make_optimizer(config.train), state_lib.make_schedule(config.train)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(setup.graphdef, tx, schedule, 1, fam.objective),
                                       state_lib.state_shardings(setup, tx), mesh, fam.objective)
  state = state_lib.abstract_state(setup, tx)
  batch = {k: jax.ShapeDtypeStruct((config.train.batch_size, *s), d, sharding=mesh_lib.batch_sharding(mesh, 1 + len(s)))
           for k, (s, d) in fam.batch_shapes(config).items()}
  with jax.set_mesh(mesh):
    cost = train_step.lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost['flops'] / (config.train.batch_size * config.data.seq_len)


def formula(config) -> float:
  d = config.data
  return families.flops_per_token(config.model, config.tokenizer.vocab_size, d.seq_len, d.max_predictions)


@pytest.mark.parametrize('case', sorted(FLOPS_CASES))
def test_flops_formula_matches_xla(case):
  spec, extra = FLOPS_CASES[case]
  # Unscanned, and (GPT) the whole-logits loss: XLA's cost analysis counts a loop body once, not per iteration.
  chunks = ['--config.model.loss_chunk=0'] if spec.startswith('configs/gpt.py') else []
  config = load(spec, ['--config.model.scan_layers=false', *chunks, *FLOPS_COMMON, *extra])
  ratio = formula(config) / xla_flops_per_token(config)
  assert 0.9 <= ratio <= 1.1, ratio


def test_elmo_flops_formula_matches_xla(monkeypatch):
  """The LSTM recurrence is a lax.scan over time, whose body XLA counts once: the step unrolled by 2 adds one
  more body, so XLA's full count = count(unroll 1) + (T - 1) x (count(unroll 2) - count(unroll 1))."""
  config = load('configs/elmo.py:tiny', [*FLOPS_COMMON[:2], '--config.data.seq_len=64'])
  scan = jax.lax.scan
  counts = []
  for unroll in (1, 2):
    monkeypatch.setattr(jax.lax, 'scan', functools.partial(scan, unroll=unroll))
    counts.append(xla_flops_per_token(config))
  monkeypatch.setattr(jax.lax, 'scan', scan)
  full = counts[0] + (config.data.seq_len - 1) * (counts[1] - counts[0])
  ratio = formula(config) / full
  assert 0.9 <= ratio <= 1.1, (ratio, counts)
