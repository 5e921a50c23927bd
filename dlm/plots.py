"""PNG plots of a run's metrics.jsonl (matplotlib, no display needed)."""
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from etils import epath  # noqa: E402

from dlm import metrics as metrics_lib  # noqa: E402


def rl_curves(workdir: str) -> epath.Path:
  """Rollout reward / accuracy per step and held-out greedy accuracy → <workdir>/plots/rl.png."""
  rows = metrics_lib.read_metrics(workdir)
  out = epath.Path(workdir) / 'plots'
  out.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  for key, label in (('rl/reward_mean', 'rollout reward'), ('rl/accuracy', 'rollout accuracy')):
    pts = [(r['step'], r[key]) for r in rows if key in r]
    if pts:
      ax[0].plot(*zip(*pts), label=label, lw=1)
  ax[0].set(xlabel='RL step', title='rollouts (temperature sampling)')
  ax[0].legend()
  pts = [(r['step'], r['eval/accuracy']) for r in rows if 'eval/accuracy' in r]
  if pts:
    ax[1].plot(*zip(*pts), 'o-')
  ax[1].set(xlabel='RL step', ylabel='accuracy', ylim=(0, 1),
            title='held-out accuracy (greedy)')
  fig.tight_layout()
  path = out / 'rl.png'
  with path.open('wb') as f:
    fig.savefig(f, dpi=100)
  plt.close(fig)
  return path
