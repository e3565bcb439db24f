"""Encoder training as an MLflow run, registry aliases, and promotion, on a learnable synthetic set.

Users prefer one of three hidden themes; their history texts name a sport, the personas a colour,
and the sport→colour mapping is arbitrary. The un-tuned encoder cannot know it (about chance
among an item's three personas); a working fine-tune learns it from the alignment pairs.
"""

import random

import mlflow
import mlflow.sentence_transformers
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import make_config, promote_counting
from persona4rec.errors import InputError
from persona4rec.schemas import ALIGNMENT_PAIRS, ITEM_PERSONAS, ITEM_SUMMARIES, REVIEW_ASPECTS, REVIEWS, SPLITS
from persona4rec.tables import TableStore
from persona4rec.training import job, promote
from persona4rec.training.data import Example, unique_batches
from persona4rec.training.encoder import add_lora, load_encoder, user_vector
from persona4rec.training.registry import CHALLENGER, CHAMPION, register, setup_mlflow
from persona4rec.training.trainer import info_nce

SPORTS = ["tennis", "sailing", "climbing"]
COLOURS = ["crimson", "teal", "amber"]


def synthetic_tables(spark, cfg, users=48, items=12, per_user=6):
    rng = random.Random(0)
    store = TableStore(spark, cfg)
    splits, reviews, aspects, pairs, personas = [], [], [], [], []
    for i in range(items):
        for t, colour in enumerate(COLOURS):
            text = f"The {colour} collector. Wants {colour} editions of item {i}. Picks {colour} every time."
            personas.append((f"I{i}#{t}", f"I{i}", t, f"The {colour} collector", f"Wants {colour} editions.",
                             f"Picks {colour} every time.", text, "llm", 3, "succeeded", None, None, None))
    for u in range(users):
        theme = u % 3
        chosen = rng.sample(range(items), per_user)
        for seq, i in enumerate(chosen, start=1):
            ts = 1_000 + seq * 10 + u
            splits.append((f"U{u}", f"I{i}", ts, seq, "train"))
            reviews.append((f"U{u}", f"I{i}", 5.0, ts, None, f"{SPORTS[theme]} gear", None, None, "amazon2018",
                            "synthetic", seq))
            aspects.append((f"U{u}", f"I{i}", 5.0, None, f"{SPORTS[theme]} gear", "said so", None, None, None,
                            None, None, None, 3, True, None, "succeeded", None, None, None))
            if seq > 1:
                pairs.append((f"U{u}", f"I{i}", ts, f"I{i}#{theme}", "theme match",
                               [f"I{j}" for j in chosen[:seq - 1]], "succeeded", None, None, None))
    summaries = [(f"I{i}", f"Item {i}, a general product.", "llm", "succeeded", None, None, None) for i in range(items)]
    store.upsert(spark.createDataFrame(reviews, REVIEWS.schema), REVIEWS)
    store.upsert(spark.createDataFrame(splits, SPLITS.schema), SPLITS)
    store.upsert(spark.createDataFrame(summaries, ITEM_SUMMARIES.schema), ITEM_SUMMARIES)
    store.upsert(spark.createDataFrame(aspects, REVIEW_ASPECTS.schema), REVIEW_ASPECTS)
    store.upsert(spark.createDataFrame(personas, ITEM_PERSONAS.schema), ITEM_PERSONAS)
    store.upsert(spark.createDataFrame(pairs, ALIGNMENT_PAIRS.schema), ALIGNMENT_PAIRS)
    return store


def training_config(tmp_path, *extra):
    return make_config(tmp_path, f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                       f"mlflow.artifact_root={tmp_path / 'mlruns'}", "train.max_seq_length=32",
                       "train.epochs=3", "train.batch_size=8", "train.learning_rate=0.001",
                       "train.validation_fraction=0.25", "profile.k=5", "train.objective=alignment", *extra)


@pytest.mark.unit
def test_info_nce_prefers_the_diagonal():
    eye = torch.eye(4)
    assert info_nce(eye, eye, 0.05) < 1e-3
    assert info_nce(eye, eye.roll(1, 0), 0.05) > 10


@pytest.mark.unit
def test_item_persona_negatives_enter_each_rows_denominator_and_padding_does_not():
    from persona4rec.training.trainer import item_negatives

    ex = [Example("U0", "I0", ("h",), "I0#0", "p00", (("I0#0", "p00"), ("I0#1", "p01"), ("I0#2", "p02"))),
          Example("U1", "I1", ("h",), "I1#1", "p11", (("I1#0", "p10"), ("I1#1", "p11")))]
    cache = {t: torch.nn.functional.normalize(torch.tensor(v), dim=0)
             for t, v in {"p01": [0.0, 1, 0], "p02": [0.0, 0, 1], "p10": [1.0, 1, 0]}.items()}
    negatives, present = item_negatives(ex, cache, torch.device("cpu"))
    assert negatives.shape == (2, 2, 3) and present.tolist() == [[True, True], [True, False]]
    assert torch.equal(negatives[1, 0], cache["p10"]) and torch.equal(negatives[1, 1], torch.zeros(3))
    users = personas = torch.eye(3)[:2]
    plain = info_nce(users, personas, 0.5)
    with_negatives = info_nce(users, personas, 0.5, negatives, present)
    # By hand: row 0 adds exp(0) twice (orthogonal negatives), row 1 adds exp(cos 45° / τ) once.
    e = np.exp(2.0)
    by_hand = (np.log(e + 1 + 2) - 2 + np.log(e + 1 + np.exp(np.sqrt(0.5) / 0.5)) - 2) / 2
    assert float(with_negatives) == pytest.approx(by_hand, rel=1e-5) and with_negatives > plain
    single = Example("U2", "I2", ("h",), "p", "t", (("p", "t"),))
    assert item_negatives([single], cache, torch.device("cpu")) is None


@pytest.mark.unit
def test_batches_never_repeat_a_user_or_an_item():
    ex = [Example(f"U{u % 5}", f"I{u % 7}", ("h",), "p", "t", ()) for u in range(60)]
    batches = unique_batches(ex, 4, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(60))
    for b in batches:
        assert len({ex[i].user_id for i in b}) == len(b) == len({ex[i].item_id for i in b})
    assert len(batches) <= 18  # 15 at best: batches are filled, not one per conflict
    heavy = [Example("U0", f"I{i}", ("h",), "p", "t", ()) for i in range(50)] + \
        [Example(f"U{u}", f"J{u}", ("h",), "p", "t", ()) for u in range(1, 151)]
    batches = unique_batches(heavy, 4, random.Random(2))
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert 50 <= len(batches) <= 53  # the heavy user's 50 pairs set the count, the others fill them
    assert sum(len(b) == 4 for b in batches) >= 48
    few = unique_batches(heavy, 4, random.Random(2), scan=2)  # past 2 open batches: after the last holder
    assert sorted(i for b in few for i in b) == list(range(200))
    for b in few:
        assert len({heavy[i].user_id for i in b}) == len(b) == len({heavy[i].item_id for i in b})
    assert len(few) <= 60


@pytest.mark.unit
def test_user_vector_is_a_normalised_decayed_mean():
    h = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # oldest, newest
    v = user_vector(h, gamma=0.5)
    expected = np.array([0.5, 1.0]) / np.linalg.norm([0.5, 1.0])
    assert np.allclose(v, expected, atol=1e-6)


@pytest.mark.spark
@pytest.mark.slow
def test_training_is_an_mlflow_run_registered_as_challenger_and_beats_the_untuned_encoder(spark, tmp_path):
    cfg = training_config(tmp_path)
    synthetic_tables(spark, cfg)
    report, model = job.fit(spark, cfg)

    # Accuracy: the fine-tuned encoder learned what the un-tuned one cannot know.
    assert report.val_pairs >= 20
    assert report.final["top1_accuracy"] >= report.baseline["top1_accuracy"] + 0.25, report
    assert report.final["top1_accuracy"] >= 0.8

    client = MlflowClient(cfg.tracking_uri())
    run = client.get_run(report.run_id)
    assert run.data.params["train.lora_rank"] == "16" and run.data.params["profile.k"] == "5"
    assert "input.alignment_pairs.delta_version" in run.data.tags
    assert len(client.get_metric_history(report.run_id, "train_loss")) == report.steps
    assert len(client.get_metric_history(report.run_id, "top1_accuracy")) == 3
    artifacts = {a.path for a in client.list_artifacts(report.run_id)}
    assert {"loss_curve.png", "config.yaml", "input_versions.json"} <= artifacts
    assert not any("api_key" in k.lower() and v for k, v in run.data.params.items())

    version = client.get_model_version_by_alias(cfg.mlflow.registered_model, CHALLENGER)
    assert str(version.version) == report.model_version and version.run_id == report.run_id
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.registered_model}@{CHALLENGER}")
    texts = ["tennis gear for weekends", "The teal collector. Wants teal editions."]
    served = np.asarray(pyfunc.predict(texts))
    trained = model.encode(texts, convert_to_numpy=True)
    assert np.allclose(served, trained, atol=1e-5)


@pytest.mark.unit
@pytest.mark.slow
def test_exact_training_with_item_persona_negatives_learns_the_alignment():
    """The non-default paths (exact gradient, hard negatives) on the same learnable task, without
    Spark: the job test above runs the defaults."""
    from persona4rec.config import TrainSettings
    from persona4rec.training.data import split_examples
    from persona4rec.training.trainer import evaluate, train

    rng = random.Random(0)
    examples = []
    for u in range(48):
        theme, chosen = u % 3, rng.sample(range(12), 6)
        for seq in range(1, 6):
            i = chosen[seq]
            personas = tuple((f"I{i}#{t}", f"The {c} collector. Wants {c} editions of item {i}.")
                             for t, c in enumerate(COLOURS))
            history = tuple(f"Item {j}, a general product. {SPORTS[theme]} gear" for j in chosen[:seq])
            examples.append(Example(f"U{u}", f"I{i}", history, *personas[theme], personas))
    train_set, val_set = split_examples(examples, 0.25, 13)
    s = TrainSettings(device="cpu", max_seq_length=32, epochs=3, batch_size=8, learning_rate=1e-3,
                      history_grad_items=None, item_persona_negatives=True)
    model = load_encoder(s.base_model, s.device, s.max_seq_length)
    before = evaluate(model, val_set, 0.9, s.temperature, s.batch_size)
    add_lora(model, s.lora_rank, s.lora_alpha, s.lora_dropout, s.seed)
    after = train(model, train_set, val_set, s, 0.9).epochs[-1]
    assert after["val_pairs"] >= 40
    assert after["top1_accuracy"] >= before["top1_accuracy"] + 0.25 and after["top1_accuracy"] >= 0.8, (before, after)


@pytest.mark.spark
@pytest.mark.slow
def test_promotion_takes_a_better_model_and_refuses_a_worse_one(spark, tmp_path, monkeypatch):
    cfg = training_config(tmp_path, "train.epochs=2")
    synthetic_tables(spark, cfg)
    client = setup_mlflow(cfg)
    name = cfg.mlflow.registered_model

    # v1: the un-tuned encoder becomes champion (there is none yet).
    with mlflow.start_run(run_name="untuned"):
        v1 = register(cfg, client, load_encoder(cfg.train.base_model, "cpu", 32), ["x"], {})
    first = promote.run(spark, cfg)
    assert first.promoted and first.reason == "no champion yet"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v1
    # a rerun: the challenger is the champion — measured once, its "promoted" tag kept, the run "unchanged"
    again, measured = promote_counting(spark, cfg, monkeypatch, promote, "evaluate")
    assert not again.promoted and again.reason == "challenger is already the champion" and measured == 1
    assert client.get_model_version(name, v1).tags["promotion_decision"] == "promoted"
    assert len(mlflow.search_runs(search_all_experiments=True, filter_string="tags.decision = 'unchanged'")) == 1

    # v2: a fine-tuned challenger beats it.
    report, _ = job.fit(spark, cfg)
    second = promote.run(spark, cfg)
    assert second.promoted, second
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == report.model_version

    # v3: a deliberately broken model (adapters re-initialised at random) is refused.
    broken = add_lora(load_encoder(cfg.train.base_model, "cpu", 32), 16, 32, 0.0, seed=5)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in broken.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    from persona4rec.training.encoder import merge_lora

    with mlflow.start_run(run_name="broken"):
        v3 = register(cfg, client, merge_lora(broken), ["x"], {})
    third = promote.run(spark, cfg)
    assert not third.promoted and third.challenger_version == v3
    assert third.challenger_score < third.champion_score
    assert third.metric == "validation_top1_accuracy"  # no candidates: the paper objective's own measure
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == report.model_version
    tags = client.get_model_version(name, v3).tags
    assert tags["promotion_decision"] == "refused"

    # The blend α chosen by the evaluate job travels with the model version: scoring.alpha=auto.
    from persona4rec.scoring.score import resolve_alpha
    from persona4rec.training.registry import set_blend_alpha

    auto = training_config(tmp_path, "train.epochs=2", "scoring.alpha=auto")
    # Nothing chosen yet: the run stops, never a silent α = 1 (below the generator in our quality table).
    with pytest.raises(InputError, match=rf"model version {report.model_version} .* no α chosen for generator bpr"):
        resolve_alpha(auto, report.model_version, "bpr")
    set_blend_alpha(cfg, client, report.model_version, "bpr", 0.3)
    assert resolve_alpha(auto, report.model_version, "bpr") == 0.3
    with pytest.raises(InputError, match="no α chosen for generator als"):
        resolve_alpha(auto, report.model_version, "als")
    assert resolve_alpha(training_config(tmp_path, "scoring.alpha=0.7"), report.model_version, "bpr") == 0.7


@pytest.mark.unit
def test_cached_history_user_vectors_equal_the_exact_ones_at_the_same_weights():
    from persona4rec.training.trainer import batch_user_vectors, history_cache

    model = load_encoder("packaged:all-MiniLM-L6-v2", "cpu", 32)
    model.eval()
    hist = [("a red guitar", "a blue drum", "new strings", "a quiet amp"), ("one pedal",), ("cables", "a case")]
    ex = [Example(f"U{i}", f"I{i}", h, "p", "persona", ()) for i, h in enumerate(hist)]
    with torch.no_grad():
        exact = batch_user_vectors(model, hist, 0.8)
        cache = history_cache(model, ex, 1)
        cached = batch_user_vectors(model, hist, 0.8, cache, 1)
    # Any text of a history longer than m may be left undrawn; a 1-text history is always fresh.
    assert set(cache) == {"a red guitar", "a blue drum", "new strings", "a quiet amp", "cables", "a case"}
    assert torch.allclose(exact, cached, atol=1e-5)


@pytest.mark.unit
def test_shared_history_texts_pass_once_with_the_same_value_and_gradient():
    from persona4rec.training.trainer import encode_unique, encode_with_grad

    model = add_lora(load_encoder("packaged:all-MiniLM-L6-v2", "cpu", 32), 4, 8, 0.0, seed=0)
    model.eval()  # no dropout: both paths see the same function
    texts = ["an item summary", "another item", "an item summary", "a third", "another item"]
    lora = [p for p in model.parameters() if p.requires_grad]
    target = torch.linspace(-1, 1, 384)

    def value_and_grad(encode):
        model.zero_grad()
        emb = encode(model, texts)
        (emb @ target).pow(2).sum().backward()
        return emb.detach(), torch.cat([p.grad.flatten() for p in lora])

    once, grad_once = value_and_grad(encode_unique)
    each, grad_each = value_and_grad(encode_with_grad)
    assert torch.allclose(once, each, atol=1e-5) and torch.allclose(grad_once, grad_each, rtol=1e-4, atol=1e-6)
    assert torch.equal(once[0], once[2]) and grad_once.abs().sum() > 0


@pytest.mark.unit
def test_drawn_texts_write_their_fresh_embedding_back_to_the_cache():
    from persona4rec.training.trainer import batch_user_vectors, encode_with_grad, history_cache

    model = load_encoder("packaged:all-MiniLM-L6-v2", "cpu", 32)
    hist = [("a red guitar", "a blue drum", "new strings"), ("one pedal", "a case")]
    ex = [Example(f"U{i}", f"I{i}", h, "p", "persona", ()) for i, h in enumerate(hist)]
    cache = history_cache(model, ex, 1)
    stale = {t: torch.zeros(384) for t in cache}  # as if embedded by very different weights
    cache.update(stale)
    model.eval()
    with torch.no_grad():
        batch_user_vectors(model, hist, 0.8, cache, 1, np.random.default_rng(0))
        fresh = {t: v for t, v in zip(cache, encode_with_grad(model, list(cache)))}
    written = {t for t in cache if cache[t].abs().sum() > 0}
    # one drawn text per user
    assert len(written) == 2 and len(written & set(hist[0])) == 1 and len(written & set(hist[1])) == 1
    for t in written:
        assert torch.allclose(cache[t], fresh[t], atol=1e-5)


@pytest.mark.unit
def test_drawn_history_gradient_equals_the_exact_one_in_expectation():
    from persona4rec.training.encoder import decay_weights
    from persona4rec.training.trainer import combine_history, draw_grad_items

    rng = np.random.default_rng(3)
    a = torch.as_tensor(rng.normal(size=(5, 4)), dtype=torch.float64)
    w = torch.as_tensor(decay_weights(5, 0.8), dtype=torch.float64)
    target = torch.as_tensor(rng.normal(size=4), dtype=torch.float64)

    def grad(drawn):
        theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        e = torch.tanh(theta * a)  # the "encoder": rows depend on the trained parameter
        cached = [row.detach() for row in e]
        u = combine_history(cached, e[drawn], np.asarray(drawn), w)
        (u @ target).backward()
        return theta.grad.item(), u.detach()

    exact, u_exact = grad(list(range(5)))
    p = (w / w.sum()).numpy()
    expected = 0.0
    for j in range(5):  # one drawn text: the expectation over the draw, enumerated
        g, u = grad([j])
        assert torch.allclose(u, u_exact)  # the value never changes, only where the gradient flows
        expected += p[j] * g
    assert expected == pytest.approx(exact, rel=1e-9)
    assert list(draw_grad_items(w.numpy(), 9, rng)) == [0, 1, 2, 3, 4]  # short histories: all fresh
    counts = np.bincount([draw_grad_items(w.numpy(), 1, rng)[0] for _ in range(4000)], minlength=5)
    assert np.allclose(counts / 4000, p, atol=0.03)  # drawn in proportion to the decay weight


@pytest.mark.unit
def test_batched_validation_equals_the_per_example_computation(monkeypatch):
    from persona4rec.training import trainer
    from persona4rec.training.encoder import embed
    from persona4rec.training.trainer import evaluate

    model = load_encoder("packaged:all-MiniLM-L6-v2", "cpu", 32)
    rng = random.Random(4)
    words = ["jazz", "strings", "tuner", "cable", "pedal", "drums", "capo", "amp", "picks", "stand"]
    personas = {f"I{i}": tuple((f"I{i}#{p}", f"Player who needs a {words[(i + p) % 10]}") for p in range(1 + i % 3))
                for i in range(8)}
    examples = []
    for u in range(12):
        item = f"I{u % 8}"
        pid, text = personas[item][u % len(personas[item])]
        history = tuple(f"bought a {rng.choice(words)} for {rng.choice(words)}" for _ in range(1 + u % 4))
        examples.append(Example(f"U{u}", item, history, pid, text, personas[item]))
    got = evaluate(model, examples, 0.8, 0.05, 4)

    users = np.stack([user_vector(embed(model, list(e.history)), 0.8) for e in examples])  # the previous way
    aligned = embed(model, [e.persona_text for e in examples])
    losses = [float(info_nce(torch.from_numpy(users[s:s + 4]), torch.from_numpy(aligned[s:s + 4]), 0.05))
              for s in range(0, 12, 4)]
    judged = [(e, u) for e, u in zip(examples, users) if len(e.item_personas) >= 2]
    hits = sum(e.item_personas[int(np.argmax(embed(model, [t for _, t in e.item_personas]) @ u))][0] == e.persona_id
               for e, u in judged)
    assert got["val_pairs"] == len(judged) > 0
    assert got["top1_accuracy"] == hits / len(judged)
    assert got["val_loss"] == pytest.approx(np.mean(losses), abs=1e-4)
    monkeypatch.setattr(trainer, "EVAL_CHUNK", 5)  # chunks of 8 (two loss batches): the same figures
    chunked = evaluate(model, examples, 0.8, 0.05, 4)
    assert chunked["val_pairs"] == got["val_pairs"] and chunked["top1_accuracy"] == got["top1_accuracy"]
    assert chunked["val_loss"] == pytest.approx(got["val_loss"], abs=1e-5)


@pytest.mark.slow
def test_a_recreated_registry_never_gets_the_cached_model_of_its_namesake_version(tmp_path, monkeypatch):
    """Version numbers repeat across registries (a new sqlite file, another tracking URI over the
    same warehouse): the scoring encoder and every cache keyed by it must tell the two "v1"s apart."""
    from sentence_transformers import SentenceTransformer

    from persona4rec.scoring.embedding import resolve_encoder
    from persona4rec.training.rerank import with_head
    from persona4rec.training.registry import blend_alpha, registry_version, set_blend_alpha

    text = ["a teal racket for weekend tennis"]
    refs = []
    for n, registry in enumerate(("first", "second")):
        cfg = training_config(tmp_path, f"mlflow.tracking_uri=sqlite:///{tmp_path / registry}.db",
                              f"mlflow.artifact_root={tmp_path / registry}")
        client = setup_mlflow(cfg)
        model = load_encoder(cfg.train.base_model, "cpu", 32)
        if n:  # the second registry's v1 is another model
            model = with_head(model, torch.randn(384, 384, generator=torch.Generator().manual_seed(1)).numpy())
        with mlflow.start_run(run_name=registry):
            assert register(cfg, client, model, ["x"], {}, alias=CHAMPION) == "1"
        ref = resolve_encoder(cfg)
        assert registry_version(ref.version) == "1" and ref.version != "1"
        assert np.allclose(SentenceTransformer(ref.path, device="cpu").encode(text), model.encode(text), atol=1e-5)
        set_blend_alpha(cfg, client, ref.version, "als", 0.1 * (n + 1))  # the key finds its registry version
        assert blend_alpha(cfg, ref.version, "als") == pytest.approx(0.1 * (n + 1))
        refs.append(ref)
    assert refs[0].version != refs[1].version and refs[0].path != refs[1].path
    def no_download(uri):
        raise AssertionError(f"{uri} loaded again: the complete folder should be reused")

    monkeypatch.setattr(mlflow.sentence_transformers, "load_model", no_download)
    assert resolve_encoder(cfg) == refs[1]  # stable: the complete folder is reused, not rewritten
    # α of the second registry's v1 is never read for vectors the first one's v1 embedded
    with pytest.raises(InputError, match=rf"model version {refs[0].version} .* is not version 1 .* rerun build_index"):
        blend_alpha(cfg, refs[0].version, "als")
