"""Image-modality data: batch layout, determinism, cached features == uncached, eval sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lab.data.batch import IGNORE_INDEX

from lab.data.image import ImageDataModule
from lab.errors import LabError
from lab.models.visual import VisualEncoder
from tasks.retrieval import RetrievalTask
from tasks.vocab import BOS, CTX_END, IMG, QUE

torch.set_num_threads(1)
RENDER = {"canvas_size": 32, "object_size": 8, "gap": 1}


@pytest.fixture(scope="module")
def task():
    return RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=(2, 4), ood_objects=(5, 6), eval_size=24, seed=3)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return VisualEncoder("convnext_atto", 1, 32)


def make(task, encoder, **kw):
    return ImageDataModule(task, batch_size=16, eval_batch_size=10, encoder=encoder, render=RENDER, pool_size=8, **kw)


def test_batch_layout(task, encoder):
    dm = make(task, encoder)
    v, P = task.vocab, encoder.n_tokens
    batch = dm.train_batch(0)
    assert dm.modality == "image" and dm.val_names == ["image_id", "image_ood"]
    assert batch["image_features"].shape == (16, P, encoder.dim)
    for i in range(16):
        n = int(batch["n_objects"][i])
        t = batch["tokens"][i]
        end = int(batch["answer_pos"][i])
        assert t[0] == v[BOS] and (t[1 : 1 + P] == v[IMG]).all() and t[1 + P] == v[CTX_END]
        roles = {name: [p for p in pos[i].tolist() if p >= 0] for name, pos in batch.roles.items()}
        assert roles["ctx_end"] == [1 + P] and end == 1 + P + 1 + 2 * n + 1 and roles["query"] == [end]
        assert roles["image"] == list(range(1, 1 + P)) and roles["context_color"] == [] and roles["query_marker"] == [end - 1]
        assert t[end - 1] == v[QUE] and batch["attend"][i, : end + 1].all() and not batch["attend"][i, end + 1 :].any()
        colors, shapes, items = (batch.objects[k][i, :n].tolist() for k in ("colors", "shapes", "items"))
        q = int(batch.objects["query_object"][i])
        assert v.decode([t[end]])[0] == f"color_{colors[q]}"
        assert v.decode([batch["targets"][i]])[0] == f"item_{items[q]}"
        pairs = zip(roles["association_shape"], roles["association_item"])
        for j, (sp, ip) in enumerate(pairs):  # associations name the objects' shapes
            obj = int(batch.objects["association_order"][i, j])
            assert v.decode([t[sp], t[ip]]) == [f"shape_{shapes[obj]}", f"item_{items[obj]}"]
        assert v[IMG] not in t[1 + P :].tolist()
        assert int(task.id_objects[0]) <= n <= int(task.id_objects[1])


def test_train_batch_is_a_pure_function_of_index(task, encoder):
    a, b = make(task, encoder), make(task, encoder)
    x, y = a.train_batch(5), b.train_batch(5)
    assert x.keys() == y.keys()
    for k in x:
        if isinstance(x[k], dict):
            assert x[k].keys() == y[k].keys() and all(torch.equal(x[k][n], y[k][n]) for n in x[k]), k
        else:
            assert torch.equal(x[k], y[k]), k
    assert not torch.equal(a.train_batch(6)["tokens"], x["tokens"]) or not torch.equal(a.train_batch(6)["targets"], x["targets"])
    stream = iter(a.train_stream)
    assert torch.equal(next(stream)["tokens"], a.train_batch(0)["tokens"])


def test_cached_features_equal_uncached(task, encoder, tmp_path):
    dm = make(task, encoder, feature_cache_dir=str(tmp_path))
    batch = dm.train_batch(2)
    samples = dm.images.train_batch(2, dm.batch_size)
    pictures = np.stack([dm.images.image(s.context) for s in samples])
    direct = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        uncached = encoder.eval()(direct)
    assert torch.allclose(batch["image_features"], uncached, atol=1e-5)
    assert list(tmp_path.rglob("*.safetensors"))   # written to disk ...
    again = make(task, encoder, feature_cache_dir=str(tmp_path))
    assert torch.equal(again.train_batch(2)["image_features"], batch["image_features"])  # ... and read back
    # a different encoder does not reuse the cache
    other = VisualEncoder("convnext_atto", 1, 32)
    assert make(task, other, feature_cache_dir=str(tmp_path)).cache_key() != dm.cache_key()


def test_trainable_encoder_gets_images(task, encoder):
    dm = make(task, encoder, frozen=False)
    batch = dm.train_batch(0)
    assert "image_features" not in batch
    assert batch["images"].shape == (16, 3, 32, 32) and 0 <= batch["images"].min() and batch["images"].max() <= 1


def test_eval_sets_match_text_eval_samples(task, encoder):
    dm = make(task, encoder)
    for split in task.splits:
        text = task.eval_set(split, noise=False)
        images = dm.images.eval_set(split)
        assert [(s.colors, s.shapes, s.items, s.query_object, s.answer) for s in text] == [
            (s.colors, s.shapes, s.items, s.query_object, s.answer) for s in images
        ]
        batches = list(dm.eval_batches(split))
        assert sum(len(b["targets"]) for b in batches) == task.eval_size
        again = list(make(task, encoder).eval_batches(split))
        assert all(torch.equal(a["image_features"], b["image_features"]) for a, b in zip(batches, again))
    ood = next(iter(dm.eval_batches("ood")))
    assert ood["n_objects"].min() >= 5


def test_config_errors(task, encoder):
    with pytest.raises(LabError, match="visual encoder"):
        ImageDataModule(task, 8, 8, render=RENDER)
    with pytest.raises(LabError, match="canvas_size"):
        ImageDataModule(task, 8, 8, encoder=encoder, render={**RENDER, "canvas_size": 40})


def test_follow_up_queries_in_image_training(encoder):
    task = RetrievalTask(n_colors=8, n_shapes=8, n_items=8, id_objects=(2, 4), ood_objects=(5, 6), eval_size=8,
                         seed=3, train_queries=3)
    dm = make(task, encoder)
    batch = dm.train_batch(0)
    v = task.vocab
    for i in range(len(batch["targets"])):
        t = batch["tokens"][i]
        a = int(batch["answer_pos"][i])
        assert int(t[a + 1]) == int(batch["targets"][i])            # the first answer continues the prompt
        labelled = [p for p in range(t.shape[0]) if batch.labels[i, p] != IGNORE_INDEX]
        assert labelled[0] == a and len(labelled) == 1 + min(int(batch.n_objects[i]) - 1, 2)
        for pos in labelled[1:]:
            target = int(batch.labels[i, pos])
            assert v.decode([t[pos - 1]])[0] == "[QUE]" and v.decode([target])[0].startswith("item_")
    assert (batch["tokens"] == v["[IMG]"]).sum(1).eq(encoder.n_tokens).all()
