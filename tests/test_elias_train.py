"""ELIAS end to end on tiny synthetic data: two-stage training, search against brute force
(host and device merge identical), resume after SIGTERM in either stage, evaluation from
the run directory, sharded vs unsharded scores, training on 1 vs 8 devices."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest

from helpers import load_config, run_python, train_stages as _train
from jaxidx.data import synthetic_xmc
from jaxidx import evaluate as evaluate_lib
from jaxidx.methods.elias import log_edge_weights
from jaxidx.methods.elias.maths import cluster_logits, route_clusters
from jaxidx.runner import build, evaluate_checkpoint
from jaxidx.train.checkpoint import CheckpointError, Checkpointer
from jaxidx.train.loop import fit_stages
from jaxidx.train.metrics_log import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**train):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import elias as presets  # noqa: E402
    c = presets.tiny()
    c.train.update(epochs=2, stage2_epochs=2, batch_size=64, log_every=5, **train)
    return c


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Re-runs of the same tiny model (resume, evaluation) reuse its compiled programs."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)):
        jax.config.update(n, v)
    yield
    for n, v in old.items():
        jax.config.update(n, v)


@pytest.fixture(scope="module")
def data():
    return synthetic_xmc(n_train=384, n_test=64, n_features=120, n_labels=60, seed=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    workdir = tmp_path_factory.mktemp("elias")
    task, result = _train(workdir, _config(), data)
    return workdir, task, result


def test_two_stages_train_and_learn(trained):
    workdir, task, result = trained
    assert task.stage == 2 and not result.interrupted
    assert result.step == 2 * task.steps_per_epoch
    for stage in ("stage1", "stage2"):
        with open(workdir / stage / "metrics.jsonl") as f:
            rec = [json.loads(line) for line in f]
        losses = [r["train/loss"] for r in rec if "train/loss" in r]
        assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert "edges" in result.params and result.aux["members"].shape == (task.method.n_clusters, task.width)
    stage1 = Checkpointer(str(workdir / "stage1"), read_only=True)
    _, meta = stage1.read_meta()
    stage1.close()
    assert 0 < meta["train_seconds"] < result.train_seconds  # the last stage counts the whole run's time


def test_dense_and_sparse_layouts_give_the_same_loss_and_gradients(data):
    """[batch, L] arrays with a bisection threshold == sort-based [batch, K] shortlist (no tied paths)."""
    out = {}
    for layout in ("dense", "sparse"):
        c = _config()
        c.model.update(layout=layout, beta=1.0, shortlist=30)  # beta 1: no saturated (tied) edge weights
        c.train.label_optimizer = "dense"  # the loss alone, without the lazy optimizer's row ids
        method, _, _ = build(c, data=data)
        params1, _ = method.stage("stage1").init(jax.random.key(0))
        task = method.stage("stage2", types.SimpleNamespace(params=params1))
        assert task.train_k < task.train_beam * task.width  # the top-K cut is exercised
        params, aux = task.init(jax.random.key(1))
        f = jax.jit(jax.value_and_grad(lambda p, b, a: task.loss(p, b, a, jax.random.key(2)), has_aux=True))
        out[layout] = f(params, task.batch(0, 0), task.device_aux(aux))
    (ld, md), gd = out["dense"]
    (ls, ms), gs = out["sparse"]
    np.testing.assert_allclose(ld, ls, rtol=1e-5)
    for k in md:
        np.testing.assert_allclose(md[k], ms[k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(gd), jax.tree.leaves(gs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def _brute_force(task, params, aux, queries, k):
    """Every label scored by best path over all clusters times its classifier, in numpy."""
    x = task.method.features(queries)
    phi, _, _ = route_clusters(task.method.encoder, task.config.model.alpha, params, x, beam=1)
    logits = np.asarray(cluster_logits(params, phi), np.float64)
    e = np.exp(logits - logits.max(1, keepdims=True))
    s = np.minimum(1.0, task.config.model.alpha * e / e.sum(1, keepdims=True))  # [Q, C]
    members = aux["members"]
    a = np.exp(np.asarray(log_edge_weights(params.get("edges"), members, task.config.model.beta), np.float64))
    L = task.method.n_labels
    path = np.zeros((x.shape[0] if not isinstance(x, dict) else x["idx"].shape[0], L))
    for c in range(members.shape[0]):
        for j, l in enumerate(members[c]):
            if l >= 0:
                path[:, l] = np.maximum(path[:, l], s[:, c] * a[c, j])
    u = np.asarray(phi, np.float64) @ np.asarray(params["labels"]["kernel"], np.float64)[:L].T \
        + np.asarray(params["labels"]["bias"], np.float64)[:L]
    score = np.where(path > 0, path / (1 + np.exp(-u)), -np.inf)
    return score, np.argsort(-score, axis=1, kind="stable")[:, :k]


def test_search_matches_brute_force_and_backends_agree(trained, data):
    _, task, result = trained
    _check_search(task, result, data)


def _with_tokens(data):
    """The synthetic rows as 'text': each row's feature ids (+2, past PAD and UNK) as its tokens."""
    def tokens(X):
        out = np.zeros((X.shape[0], 16), np.int32)
        for i in range(X.shape[0]):
            ids = X.indices[X.indptr[i]:X.indptr[i + 1]][:16] + 2
            out[i, :len(ids)] = ids
        return out
    return dataclasses.replace(data, tokens_train=tokens(data.X_train), tokens_test=tokens(data.X_test),
                               vocab_size=data.n_features + 2)


def test_transformer_encoder_over_tokens_trains_and_searches(tmp_path, data):
    config = _config()
    config.model.update(input="text", transformer={"dim": 32, "heads": 2, "layers": 1, "mlp_ratio": 2})
    text_data = _with_tokens(data)
    task, result = _train(tmp_path, config, text_data)
    assert "block0_attention" in result.params["encoder"]
    with open(tmp_path / "stage1" / "metrics.jsonl") as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    _check_search(task, result, text_data)
    index = task.index(jax.device_get(result.params), result.aux)
    queries = evaluate_lib.test_queries(text_data)
    queries["tokens"][0, 0] = text_data.vocab_size
    with pytest.raises(ValueError, match=f"token id {text_data.vocab_size} outside the vocabulary"):
        index.query(queries, {"beam": 4, "shortlist": 40}, 10)
    with pytest.raises(ValueError, match=r"tokens must be \[Q, 16\]"):
        index.query(dict(queries, tokens=queries["tokens"][:, :8]), {"beam": 4, "shortlist": 40}, 10)
    with pytest.raises(ValueError, match="queries: a text encoder needs 'tokens'"):
        index.query(evaluate_lib.test_queries(data), {"beam": 4, "shortlist": 40}, 10)
    with pytest.raises(ValueError, match="model.input: 'text' needs a data set with raw text"):
        build(config, data=data)


def _check_search(task, result, data):
    """Search == brute force over all labels with a full beam and shortlist; host == device merge."""
    params = jax.device_get(result.params)
    index = task.index(params, result.aux)
    queries = evaluate_lib.test_queries(data)
    C, L, k = task.method.n_clusters, task.method.n_labels, 10
    full = {"beam": C, "shortlist": L}
    host = index.query(queries, dict(full, backend="host"), k)
    dev = index.query(queries, dict(full, backend="device"), k)
    np.testing.assert_array_equal(host.ids, dev.ids)
    np.testing.assert_array_equal(host.n_candidates, dev.n_candidates)
    score, want = _brute_force(task, params, result.aux, queries, k)
    reachable = np.isfinite(score).sum(1)
    got_scores = np.take_along_axis(score, np.where(host.ids >= 0, host.ids, 0), 1)
    want_scores = np.take_along_axis(score, want, 1)
    ok = np.arange(k)[None] < reachable[:, None]
    np.testing.assert_allclose(got_scores[ok], want_scores[ok], rtol=1e-4)  # same ranking up to float ties
    assert (host.ids[~ok] == -1).all()
    # A narrower search also agrees across backends, and returns -1 beyond its shortlist.
    narrow = {"beam": 2, "shortlist": 5}
    h = index.query(queries, narrow, k)
    d = index.query(queries, dict(narrow, backend="device"), k)
    np.testing.assert_array_equal(h.ids, d.ids)
    assert (h.ids[:, 5:] == -1).all()


def test_resume_after_sigterm_in_either_stage_matches_uninterrupted(tmp_path, trained, data):
    _, _, ref = trained
    config = _config()
    for stop_at in (("stage1", 7), ("stage2", 3)):
        task, result = _train(tmp_path, config, data, stop_at=stop_at)
        assert result.interrupted and task.method.stages[task.stage - 1] == stop_at[0]
    task, result = _train(tmp_path, config, data)
    assert not result.interrupted and result.step == ref.step
    for a, b in zip(jax.tree.leaves(jax.device_get(result.params)), jax.tree.leaves(jax.device_get(ref.params))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(result.aux["members"], ref.aux["members"])


def test_lazy_label_rows_train_and_resume_bit_identically(tmp_path, data):
    """Sparse layout: the label classifiers train lazily (only shortlisted rows move) and a run stopped
    in stage 2 resumes to the uninterrupted run's parameters exactly."""
    config = _config()
    config.model.layout = "sparse"
    task, ref = _train(tmp_path / "ref", config, data)
    assert task.lazy_labels and not ref.interrupted
    _, stopped = _train(tmp_path / "resumed", config, data, stop_at=("stage2", task.steps_per_epoch + 2))
    assert stopped.interrupted
    _, resumed = _train(tmp_path / "resumed", config, data)
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.params)), jax.tree.leaves(jax.device_get(ref.params))):
        np.testing.assert_array_equal(a, b)
    with open(tmp_path / "ref" / "stage2" / "metrics.jsonl") as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    config.train.label_optimizer = "dense"  # another optimizer state: refused, naming the field
    with pytest.raises(CheckpointError, match="label_optimizer=lazy"):
        _train(tmp_path / "ref", config, data)


def test_evaluate_from_run_directory(trained, data, monkeypatch):
    workdir, _, _ = trained
    import jaxidx.runner as runner
    monkeypatch.setattr(runner, "load", lambda spec: data)
    out = evaluate_checkpoint(str(workdir), overrides={"search.settings": [{"beam": 4, "shortlist": 30}]})
    assert out["method"] == "elias" and out["results"][0]["P@1"] > 0
    # Named by step and a digest of the overrides, beside (never over) the training run's eval.json.
    assert os.path.basename(out["eval_path"]).startswith(f"eval-step{out['step']}-")
    assert os.path.exists(out["eval_path"]) and out["eval_path"].startswith(str(workdir))
    with pytest.raises(ValueError, match="exists .* pass --overwrite"):
        evaluate_checkpoint(str(workdir), overrides={"search.settings": [{"beam": 4, "shortlist": 30}]})


_SHARDED = textwrap.dedent("""
    import sys, types
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, "configs")
    import elias as presets
    from jaxidx.data import synthetic_xmc
    from jaxidx.methods.elias import label_logits
    from jaxidx.runner import build
    from jaxidx.train import mesh as mesh_lib, state as state_lib

    assert jax.device_count() == 8
    data = synthetic_xmc(n_train=256, n_test=16, n_features=80, n_labels=50, seed=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(-1, 50, (64, 20)), jnp.int32)
    out = {}
    for mp in (1, 4):
        c = presets.tiny()
        c.train.batch_size = 64
        c.mesh.model_parallel = mp
        method, _, mesh = build(c, data=data)
        params1, _ = method.stage("stage1").init(jax.random.key(0))
        task = method.stage("stage2", types.SimpleNamespace(params=params1))
        params, aux = task.init(jax.random.key(1))
        tx = task.optimizer(10)
        state = state_lib.create(params, tx)
        sh = state_lib.state_shardings(state, mesh, task.leaf_spec)
        state = jax.device_put(state, sh)
        if mp > 1:  # label rows and edge rows split 4 ways, the rest replicated
            for name in ("labels", "edges"):
                leaf = state.params[name]["kernel"] if name == "labels" else state.params[name]
                assert leaf.addressable_shards[0].data.shape[0] == leaf.shape[0] // mp, (name, leaf.sharding)
        batch = mesh_lib.put_batch(task.batch(0, 0), mesh)
        aux_dev = mesh_lib.put_replicated(task.device_aux(aux), mesh)
        scores = jax.jit(lambda p, x: [label_logits(p["labels"], task.encode(p, x), ids, dense)
                                       for dense in (True, False)])(state.params, batch["x"])
        loss, metrics = jax.jit(lambda p, b, a: task.loss(p, b, a, jax.random.key(3)))(state.params, batch, aux_dev)
        step = state_lib.make_train_step(task.loss, tx, mesh, sh, 0)
        state, _ = step(state, batch, aux_dev)
        out[mp] = (jax.device_get(scores), float(loss), jax.device_get(metrics), jax.device_get(state.params))
    (s1, l1, m1, p1), (s4, l4, m4, p4) = out[1], out[4]
    for a, b in zip(s1, s4):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    for k in m1:
        np.testing.assert_allclose(m1[k], m4[k], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    print("OK")
""")


def test_sharded_over_labels_matches_unsharded():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def devices_summary(workdir: str, model_parallel: int = 1, layout: str = "dense") -> dict:
    """Train the tiny preset for an epoch of each stage; what the 1- vs 8-device test compares. The sparse
    layout trains the label classifiers lazily (train.label_optimizer 'auto')."""
    config = load_config("configs/elias.py:tiny", **{"train.epochs": 1, "train.stage2_epochs": 1, "train.log_every": 1,
                                                    "mesh.model_parallel": model_parallel, "model.layout": layout})
    method, data, mesh = build(config)
    _, res = fit_stages(method, config, workdir, mesh, data_fingerprint=data.fingerprint(), progress=False)
    losses = [r["train/loss"] for s in method.stages for r in read_metrics(os.path.join(workdir, s))
              if "train/loss" in r]
    return {"devices": jax.device_count(), "losses": losses, "members": res.aux["members"].ravel().tolist(),
            "label_rows_per_device": res.params["labels"]["kernel"].addressable_shards[0].data.shape[0],
            "params": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(res.params)]}


def test_one_vs_eight_devices_same_training(tmp_path):
    """Both stages on 8 devices, data parallel and with the label classifier split over 'model', = 1 device;
    with dense label updates and with lazy ones (rows scattered into the split classifier)."""
    code = ("import json, sys; sys.path.insert(0, 'tests'); from test_elias_train import devices_summary; "
            "print(json.dumps([devices_summary({!r} + str(mp) + layout, mp, layout) for mp, layout in {}]))")
    runs1, runs8 = [(1, "dense"), (1, "sparse")], [(1, "dense"), (4, "dense"), (4, "sparse")]
    if jax.device_count() == 1:
        ones = [devices_summary(str(tmp_path / f"one{mp}{layout}"), mp, layout) for mp, layout in runs1]
    else:
        ones = run_python(code.format(str(tmp_path / "one"), runs1), {"JAX_NUM_CPU_DEVICES": "1"})
    eights = run_python(code.format(str(tmp_path / "eight"), runs8), {"JAX_NUM_CPU_DEVICES": "8"})
    one = dict(zip(("dense", "sparse"), ones))
    assert [r["devices"] for r in ones + eights] == [1, 1, 8, 8, 8]
    assert eights[1]["label_rows_per_device"] == one["dense"]["label_rows_per_device"] // 4
    for (_, layout), other in zip(runs8, eights):
        ref = one[layout]
        np.testing.assert_allclose(ref["losses"], other["losses"], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(ref["members"], other["members"])  # the same stage-2 adjacency
        for a, b in zip(ref["params"], other["params"]):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
