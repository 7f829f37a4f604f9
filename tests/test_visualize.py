"""Tests of visualize.py on a tiny untrained model and a tiny synthetic set (CPU, 32 px, a few seconds).

The pictures are checked by their size (from the layout constants), by where the heat lands for a known
attention map, and by the numbers the figure functions return.

    python -m pytest -q tests/test_visualize.py
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import visualize as V
from cca import CCA, CCAConfig, build_model
from data import EvalItems, load_image, load_meta

S = 32  # image side; the tiny arch has output stride 8, so a 4 x 4 patch grid


@pytest.fixture(scope="module")
def tiny(synth):
    """An untrained tiny model on conftest.py's small synthetic set (32 px), and that set's test queries and candidates."""
    root = synth
    meta = load_meta("synthetic", root)
    torch.manual_seed(0)
    model = CCA(CCAConfig(arch="tiny", num_conditions=len(meta["attributes"]), img_size=S, out_dim=16)).eval()
    return dict(root=root, meta=meta, model=model,
                query=EvalItems("synthetic", root, "test", "query", S),
                cands=EvalItems("synthetic", root, "test", "candidate", S))


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size

# -----------------------------------------------------------------------------
# attention figure


def test_attention_figure_size_and_panels(tiny, tmp_path):
    K = len(tiny["meta"]["attributes"])  # 5: six panels with the input, one row
    side = V.panel_side(S)
    assert side == 192  # 32 px scaled up 6 times
    cols, rows = V.grid_shape(K + 1)
    assert (cols, rows) == (6, 1)
    out = V.attention_figure(tiny["model"], tiny["query"].paths[0], tiny["meta"], str(tmp_path / "a.png"))
    H = rows * (V.LINE + side) + (rows + 1) * V.PAD
    assert png_size(out) == (cols * side + (cols + 1) * V.PAD, H + V.LINE)
    caption = np.asarray(Image.open(out).convert("RGB"))[H:]  # the line under the panels: ATTENTION_NOTE, in grey
    assert (caption != 255).any() and "mean over heads" in V.ATTENTION_NOTE and "normalised per panel" in V.ATTENTION_NOTE
    assert V.grid_shape(9) == (5, 2) and V.grid_shape(13) == (5, 3)  # FashionAI's 8 attributes + input: 2 rows


def test_heat_follows_the_attention(tiny, tmp_path, monkeypatch):
    """A one-hot attention at a different patch per condition: each panel's hottest pixel lies in that patch."""
    model, meta = tiny["model"], tiny["meta"]
    K, grid, heads = len(meta["attributes"]), model.cfg.grid, 4
    assert grid == 4
    patch = [(k * 7 + 2) % (grid * grid) for k in range(K)]  # distinct patches: 2, 9, 0, 7, 14
    seen = []

    def one_hot(images, conditions):
        seen.append(conditions.tolist())
        att = torch.full((len(conditions), heads, grid * grid), 0.01)
        for b, c in enumerate(conditions.tolist()):
            att[b, :, patch[c]] = 1.0
        return att / att.sum(-1, keepdim=True)

    monkeypatch.setattr(model, "attention_maps", one_hot)
    # a plain grey input: the panels' only structure is then the heat (a light garment seen through the cold patches
    # could outshine the hot patch's red edge in the patch averages below)
    Image.new("RGB", (S, S), (128, 128, 128)).save(tmp_path / "grey.png")
    out = V.attention_figure(model, str(tmp_path / "grey.png"), meta, str(tmp_path / "a.png"))
    assert seen == [list(range(K))]
    fig = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
    side, cell = V.panel_side(S), V.panel_side(S) // grid
    y = V.PAD + V.LINE
    for k in range(K):
        x = V.PAD + (k + 1) * (side + V.PAD)
        brightness = fig[y:y + side, x:x + side].sum(-1)  # the heat ramp ends in white: hot = bright
        r, c = np.unravel_index(brightness.argmax(), brightness.shape)
        assert (r // cell, c // cell) == divmod(patch[k], grid), f"panel of condition {k}"
        means = brightness.reshape(grid, cell, grid, cell).mean((1, 3))  # (grid, grid) patch averages
        assert means.argmax() == patch[k]


def test_heat_map_is_normalised_and_upsampled():
    att = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])  # 2 heads, a 2 x 2 grid
    m = V.heat_map(att, 8)
    assert m.shape == (8, 8) and m.min() == 0 and m.max() == 1
    assert m[0, 0] == 0 and m[-1, -1] == 1 and m[0, -1] == pytest.approx(1 / 3) and m[-1, 0] == pytest.approx(2 / 3)
    assert np.allclose(V.colorize(np.array([0.0, 1.0])), [[0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="square"):
        V.heat_map(torch.ones(1, 5), 8)


def test_attention_figure_refuses_a_model_without_attention(tiny, tmp_path):
    for method in ("triplet", "csn"):  # one embedding space, or a mask on it: no conditional attention
        baseline = build_model(CCAConfig(arch="tiny", method=method, num_conditions=len(tiny["meta"]["attributes"]), img_size=S, out_dim=16))
        with pytest.raises(ValueError, match="attention_maps"):
            V.attention_figure(baseline, tiny["query"].paths[0], tiny["meta"], str(tmp_path / "a.png"), img_size=S)

# -----------------------------------------------------------------------------
# retrieval and predict


def query_embedding(model, path, attr):
    with torch.no_grad():
        return model(load_image(path, S)[None], torch.tensor([attr]))[0]


@pytest.fixture(scope="module")
def planted(tiny):
    """Random candidate features with the query's own embedding planted at one candidate of its attribute
    and at one candidate of another attribute (which must never be returned)."""
    model, q, c = tiny["model"], tiny["query"], tiny["cands"]
    attr = int(q.attrs[0])
    mine = (c.attrs == attr).nonzero().squeeze(1)
    other = (c.attrs != attr).nonzero().squeeze(1)
    feats = torch.nn.functional.normalize(torch.randn(len(c.paths), 16, generator=torch.Generator().manual_seed(1)), dim=1)
    e = query_embedding(model, q.paths[0], attr)
    target = int(mine[len(mine) // 2])
    feats[target] = e
    feats[int(other[0])] = e
    return dict(attr=attr, mine=mine, target=target, feats=feats)


def test_retrieval_finds_the_planted_item_within_the_attribute(tiny, planted, tmp_path):
    q, c, meta = tiny["query"], tiny["cands"], tiny["meta"]
    attr, mine, target = planted["attr"], planted["mine"], planted["target"]
    value = int(c.values[target])
    out = tmp_path / "r.png"
    results = V.retrieval_figure(tiny["model"], q.paths[0], attr, meta, c, planted["feats"], str(out),
                                 topk=len(mine) + 10, query_value=value)
    assert results[0]["path"] == c.paths[target] and results[0]["rank"] == 1
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-6)
    assert sorted(r["path"] for r in results) == sorted(c.paths[i] for i in mine)  # all of attr's, nothing else
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in results] == list(range(1, len(mine) + 1))
    by_path = {c.paths[i]: int(c.values[i]) for i in mine}
    for r in results:
        assert r["value"] == by_path[r["path"]] and r["value_name"] == meta["values"][attr][r["value"]]
        assert r["correct"] == (r["value"] == value)
    k, side = len(results), V.panel_side(S)
    assert png_size(out) == (V.PAD + side + V.SEP + k * (side + V.PAD), 3 * V.PAD + 3 * V.LINE + side)
    text = V.format_retrieval(results, meta, attr)
    assert meta["attributes"][attr] in text and results[0]["value_name"] in text and len(text.splitlines()) == k + 2


def test_retrieval_topk_and_unknown_query_value(tiny, planted, tmp_path):
    results = V.retrieval_figure(tiny["model"], tiny["query"].paths[0], planted["attr"], tiny["meta"], tiny["cands"],
                                 planted["feats"], str(tmp_path / "r.png"), topk=2)
    assert len(results) == 2 and all(r["correct"] is None for r in results)
    side = V.panel_side(S)
    assert png_size(tmp_path / "r.png")[0] == V.PAD + side + V.SEP + 2 * (side + V.PAD)
    with pytest.raises(ValueError, match="candidate features"):
        V.retrieve(tiny["model"], tiny["query"].paths[0], planted["attr"], tiny["meta"], tiny["cands"], planted["feats"][:3])


def test_predict_by_attribute_name(tiny, planted, tmp_path):
    meta = tiny["meta"]
    name = meta["attributes"][planted["attr"]]
    results = V.predict(tiny["model"], tiny["query"].paths[0], name, meta, tiny["cands"], planted["feats"], topk=3)
    assert len(results) == 3 and results[0]["path"] == tiny["cands"].paths[planted["target"]]
    with pytest.raises(ValueError) as e:
        V.predict(tiny["model"], tiny["query"].paths[0], "hat_size", meta, tiny["cands"], planted["feats"])
    assert "hat_size" in str(e.value) and all(a in str(e.value) for a in meta["attributes"])

# -----------------------------------------------------------------------------
# embedding figure


def test_centroid_accuracy_by_hand():
    # two tight pairs of directions, about 90 degrees apart
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    assert V.centroid_accuracy(x, torch.tensor([0, 0, 1, 1])) == 1.0
    # swapped labels: each point's own-value centroid (the other point, leave-one-out) is the far one
    assert V.centroid_accuracy(x, torch.tensor([0, 1, 0, 1])) == 0.0
    # a value with a single item has no leave-one-out centroid: that item counts as wrong (4 of 5 right)
    x3 = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]])
    assert V.centroid_accuracy(x3, torch.tensor([0, 0, 1, 1, 2])) == pytest.approx(4 / 5)
    assert math.isnan(V.centroid_accuracy(x, torch.zeros(4, dtype=torch.long)))


def test_embedding_figure_scores_and_size(tiny, tmp_path):
    meta = tiny["meta"]
    K, n = len(meta["attributes"]), 400
    g = torch.Generator().manual_seed(0)
    attrs = torch.arange(n) % K
    values = torch.tensor([int(torch.randint(len(meta["values"][a]), (1,), generator=g)) for a in attrs.tolist()])
    centres = torch.randn(K, 10, 32, generator=g)
    clustered = centres[attrs, values] + 0.3 * torch.randn(n, 32, generator=g)
    random = torch.randn(n, 32, generator=g)
    out = tmp_path / "e.png"
    scores = V.embedding_figure([("CCA", clustered, attrs, values), ("Triplet", random, attrs, values)], meta, str(out))
    assert set(scores) == {"CCA", "Triplet"} and set(scores["CCA"]) == set(meta["attributes"])
    for a, name in enumerate(meta["attributes"]):
        chance = 1 / len(meta["values"][a])
        assert scores["CCA"][name] > 0.95
        assert scores["Triplet"][name] < chance + 0.2, name
    rows, V_max = 2, max(len(v) for v in meta["values"])
    assert png_size(out) == (V.LABEL_W + V.PAD + K * (V.PLOT + V.PAD),
                             2 * V.PAD + V.LINE + rows * (V.PLOT + V.LINE + V.PAD) + (V_max + 2) * V.LINE)
    pixels = set(map(tuple, np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3).tolist()))
    assert all(V.PALETTE[j] in pixels for j in range(max(len(v) for n, v in zip(meta["attributes"], meta["values"]) if n != "colour")))
    colour = meta["attributes"].index("colour")
    assert all(V.COLOURS[name.lower()] in pixels for name in meta["values"][colour])  # every value's colour is drawn


def test_colour_values_are_drawn_in_their_colours_and_other_palettes_called_arbitrary(tiny):
    meta = tiny["meta"]
    colour, sleeve = meta["attributes"].index("colour"), meta["attributes"].index("sleeve_length")
    colours, named = V.value_colours(meta, colour, len(meta["values"][colour]))
    assert named and meta["values"][colour][0] == "Red" and colours[0] == V.COLOURS["red"] == (214, 39, 40)
    assert colours == [V.COLOURS[v.lower()] for v in meta["values"][colour]]  # Red red, Blue blue, ...
    assert V.value_colours(meta, sleeve, 4) == (V.PALETTE[:4], False)
    darn = {"attributes": ["clothes color", "clothes pattern"], "values": [["BLACK", " White", "Gray"], ["Plain", "Dots"]]}
    assert V.value_colours(darn, 0, 3) == ([(0, 0, 0), (255, 255, 255), (127, 127, 127)], True)  # any case, spaces
    assert V.value_colours(darn, 0, 4)[1] is False  # a value without a name ("value 3"): no named colours
    assert V.value_colours({"values": [["Red", "red"]]}, 0, 2)[1] is False  # two values, one colour: told apart instead
    assert V.outline(V.COLOURS["white"]) == V.GREY and V.outline(V.COLOURS["red"]) is None
    note = V.colour_note(meta["attributes"], [a == colour for a in range(len(meta["attributes"]))])
    assert note.startswith("dot colours: 'colour' in the colours its values name") and "arbitrary" in note
    assert "arbitrary" in V.colour_note(["a", "b"], [False, False]) and "arbitrary" not in V.colour_note(["c"], [True])


def test_pca2_finds_the_principal_axes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g) * torch.tensor([10.0, 3.0, 0.1])  # variance mostly along x, then y
    p = V.pca2(x)
    assert p.shape == (200, 2)
    assert torch.corrcoef(torch.stack([p[:, 0], x[:, 0]]))[0, 1].abs() > 0.99
    assert torch.corrcoef(torch.stack([p[:, 1], x[:, 1]]))[0, 1].abs() > 0.99
    assert torch.equal(V.pca2(x), p) and torch.equal(V.pca2(x[:1]), torch.zeros(1, 2, dtype=torch.float64))
