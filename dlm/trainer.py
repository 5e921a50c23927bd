"""The one training-state machinery shared by pretraining, SFT and RL.

Pure functional core: the model is split once into (graphdef, params); a jitted
`step(state, batch) -> (state, metrics)` with explicit shardings and donated state does
micro-batched gradient accumulation (`lax.scan`; activations sharded by batch over data × fsdp),
AdamW with warm-up and global-norm clipping, and the EMA of SPEC §3. Randomness is
`fold_in(base_key, step)`, so a resumed run replays exactly the keys of an uninterrupted one.
"""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dlm import model as model_lib
from dlm import sharding

# loss_fn(model, batch, key, sample_index) -> (objective, sums): the objective is differentiated;
# `sums` are sums of logged quantities (e.g. loss and token counts), added over all scan chunks.
LossFn = Callable[[nnx.Module, Any, jax.Array, jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any


def make_optimizer(tc) -> optax.GradientTransformation:
  """AdamW, linear warm-up then constant lr, global-norm clipping (SPEC §3 recipe)."""
  warmup = max(int(tc.warmup_steps), 1)
  schedule = lambda s: tc.lr * jnp.minimum(1.0, (s + 1) / warmup)
  parts = [optax.clip_by_global_norm(tc.clip_norm)] if tc.clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=tc.b1, b2=tc.b2, eps=tc.eps,
                           weight_decay=tc.weight_decay))
  return optax.chain(*parts)


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
  n = step.astype(jnp.float32)
  return jnp.minimum(max_decay, (1.0 + n) / (10.0 + n))


def is_trainable(mcfg: model_lib.ModelConfig):
  """pred(path) of the parameters an optimizer updates: every one, or with LoRA
  (model.lora.rank > 0) only the adapters (the base stays frozen, e.g. in bfloat16)."""
  if mcfg.lora_rank == 0:
    return lambda path: True
  return model_lib.is_adapter


def partition(tree: dict, pred, path=()) -> tuple[dict, dict]:
  """(leaves where pred(path), the rest) of a nested dict, each nested like `tree`."""
  yes, no = {}, {}
  for k, v in tree.items():
    if isinstance(v, dict):
      a, b = partition(v, pred, path + (k,))
      if a:
        yes[k] = a
      if b:
        no[k] = b
    elif pred(path + (k,)):
      yes[k] = v
    else:
      no[k] = v
  return yes, no


def join(a: dict, b: dict) -> dict:
  """The union of two nested dicts with disjoint leaves (inverse of `partition`)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = join(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def abstract_params(mcfg: model_lib.ModelConfig, mesh, rules):
  """(graphdef, parameters as ShapeDtypeStructs carrying their shardings): the model's
  structure with nothing allocated — what `init` creates and a restore fills in."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(mcfg, nnx.Rngs(0))))
  shardings = nnx.to_pure_dict(sharding.param_shardings(state, rules, mesh))
  return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                nnx.to_pure_dict(state), shardings)


class Trainer:
  """Holds the static pieces (graphdef, optimizer, shardings) of one model on one mesh."""

  def __init__(self, mcfg: model_lib.ModelConfig, train_cfg, mesh, rules, seed: int):
    self.mcfg, self.tc, self.mesh, self.rules = mcfg, train_cfg, mesh, rules
    self.base_key = jax.random.key_data(jax.random.key(seed))
    self.optimizer = make_optimizer(train_cfg)
    self.use_ema = train_cfg.ema_max_decay > 0
    self.graphdef, abstract = abstract_params(mcfg, mesh, rules)
    self.param_shardings = jax.tree.map(lambda a: a.sharding, abstract)
    self.trainable = is_trainable(mcfg)
    self.trainable_shardings = partition(self.param_shardings, self.trainable)[0]
    abstract_state = jax.eval_shape(self._init, jax.random.key_data(jax.random.key(0)))
    self.state_shardings = self._state_shardings(abstract_state)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, self.state_shardings)

  def _init(self, key_data) -> TrainState:
    rngs = nnx.Rngs(jax.random.wrap_key_data(key_data))
    params = nnx.to_pure_dict(nnx.state(model_lib.Transformer(self.mcfg, rngs)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(partition(params, self.trainable)[0]),
                      ema=params if self.use_ema else None)

  def _state_shardings(self, abstract_state: TrainState) -> TrainState:
    """Optimizer moments shard like their parameters; scalars are replicated."""
    rep = sharding.replicated(self.mesh)
    p_struct = jax.tree.structure(self.trainable_shardings)

    def opt_shardings(node):
      if jax.tree.structure(node) == p_struct:
        return self.trainable_shardings
      return jax.tree.map(lambda _: rep, node)

    opt = jax.tree.map(opt_shardings, abstract_state.opt_state,
                       is_leaf=lambda n: jax.tree.structure(n) == p_struct)
    return TrainState(step=rep, params=self.param_shardings, opt_state=opt,
                      ema=self.param_shardings if self.use_ema else None)

  def init_state(self) -> TrainState:
    """Parameters are created directly in their shards (no host holds the full model)."""
    init = jax.jit(self._init, out_shardings=self.state_shardings)
    return init(self.base_key)

  def state_from_params(self, params) -> TrainState:
    """A fresh optimizer (and EMA) around given parameters: RL and SFT from a checkpoint.
    The parameters are copied: updates donate the state's buffers. Base parameters without
    this run's LoRA adapters get fresh ones (`workdir.base_params` folds a source's own in)."""
    def make(p, key_data):
      p = self._with_adapters(jax.tree.map(jnp.copy, p), key_data)
      return TrainState(step=jnp.zeros((), jnp.int32), params=p,
                        opt_state=self.optimizer.init(partition(p, self.trainable)[0]),
                        ema=p if self.use_ema else None)
    return jax.jit(make, out_shardings=self.state_shardings)(params, self.base_key)

  def _with_adapters(self, params, key_data):
    """Base parameters without this run's LoRA adapters get freshly initialised ones (only they
    are computed: the rest of the initialisation is dead code to XLA)."""
    if jax.tree.structure(params) == jax.tree.structure(self.param_shardings):
      return params
    return join(partition(self._init(key_data).params, self.trainable)[0], params)

  def params_from(self, params):
    """`params` in this run's layout (fresh LoRA adapters added where missing), placed."""
    return jax.jit(self._with_adapters, out_shardings=self.param_shardings)(params,
                                                                             self.base_key)

  # The checkpoint items of a state (see dlm.checkpoint): parameters load without the rest.
  @staticmethod
  def to_items(state: TrainState) -> dict:
    return {'params': state.params, 'ema': state.ema,
            'opt': {'step': state.step, 'opt_state': state.opt_state}}

  @staticmethod
  def from_items(items: dict) -> TrainState:
    return TrainState(step=items['opt']['step'], params=items['params'],
                      opt_state=items['opt']['opt_state'], ema=items.get('ema'))

  def abstract_items(self) -> dict:
    return self.to_items(self.abstract_state)

  def model(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)

  def activations(self):
    """Context that shards the model's activations over this mesh by the rules (rows over
    data × fsdp); enter it inside a jitted function so it is on while the model is traced."""
    return sharding.activation_sharding(self.mesh, self.rules)

  def accumulated_grads(self, loss_fn: LossFn, batch_shardings: Any, num_samples: int = 1):
    """`grads(params, batch, key) -> (grads, objective, sums)`: the mean over micro-batches ×
    Monte Carlo samples of ∇loss_fn w.r.t. the trainable parameters (all, or LoRA's adapters),
    accumulated by nested `lax.scan`s. One (micro-batch, sample) graph is alive at a time, so
    peak memory does not grow with either count.
    loss_fn(model, micro_batch, key, sample_index) gets one key per micro-batch and derives
    per-sample randomness from sample_index."""
    m, n = int(self.tc.microbatches), int(num_samples)
    grad_fn = jax.value_and_grad(  # w.r.t. the trainable parameters only
        lambda p, frozen, b, k, j: loss_fn(self.model(join(p, frozen)), b, k, j), has_aux=True)

    def split_micro(x):  # strided rows: every micro-batch keeps every shard's share
      return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)

    def add(a, b):
      return jax.tree.map(jnp.add, a, b)

    def grads(params, batch, key):
      with self.activations():
        return _grads(params, batch, key)

    def _grads(params, batch, key):
      params, frozen = partition(params, self.trainable)
      micro = jax.tree.map(split_micro, batch)

      def per_micro(carry, xs):
        i, mb = xs
        mb = jax.lax.with_sharding_constraint(mb, batch_shardings)
        k = jax.random.fold_in(key, i)

        def per_sample(carry, j):
          (obj, sums), g = grad_fn(params, frozen, mb, k, j)
          return add(carry, (g, sums)), obj

        return jax.lax.scan(per_sample, carry, jnp.arange(n))

      zeros_g = jax.tree.map(jnp.zeros_like, params)
      (_, sums0), _ = jax.eval_shape(grad_fn, params, frozen,
                                     jax.tree.map(lambda x: x[0], micro), key, 0)
      zeros_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums0)
      (g, sums), objs = jax.lax.scan(per_micro, (zeros_g, zeros_s), (jnp.arange(m), micro))
      return jax.tree.map(lambda x: x / (m * n), g), objs.mean(), sums

    return grads

  def compile_step(self, loss_fn: LossFn, batch_shardings: Any, num_samples: int = 1):
    """Jitted `step(state, batch) -> (state, metrics)`: accumulated grads (see
    `accumulated_grads`), then AdamW and the EMA; state is donated."""
    grads_fn = self.accumulated_grads(loss_fn, batch_shardings, num_samples)

    def step(state: TrainState, batch):
      key = jax.random.fold_in(jax.random.wrap_key_data(self.base_key), state.step)
      grads, objective, sums = grads_fn(state.params, batch, key)
      trainable, frozen = partition(state.params, self.trainable)
      updates, opt_state = self.optimizer.update(grads, state.opt_state, trainable)
      params = join(optax.apply_updates(trainable, updates), frozen)
      ema = state.ema
      if self.use_ema:
        d = ema_decay(state.step, self.tc.ema_max_decay)
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema, params)
      metrics = {'objective': objective, 'grad_norm': optax.tree.norm(grads), **sums}
      return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return jax.jit(step, in_shardings=(self.state_shardings, batch_shardings),
                   out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                   donate_argnums=0)
