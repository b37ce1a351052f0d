import numpy as np
import pytest

from groundlab.tldr.labels import diff_labels
from groundlab.tldr.metrics import (
    ScoredResponse,
    hallucination_rates,
    rate_correlation,
    response_scores,
    sentence_ids_from_text,
    tldr_metrics,
)


def test_response_scores_hand_made():
    # two sentences; the second holds the one bad token, which the model flags, plus a false alarm in
    # the first sentence
    r = ScoredResponse(labels=[1, 1, 1, 1, 0, 1], probs=[0.9, 0.2, 0.8, 0.9, 0.1, 0.7], sentence_ids=[0, 0, 0, 1, 1, 1])
    a_t, a_s, a_r = response_scores(r)
    assert a_t == pytest.approx(5 / 6)
    assert a_s == pytest.approx(1 / 2)  # sentence 0: pred prod 0 vs true 1 (wrong); sentence 1: 0 vs 0 (right)
    assert a_r == 1.0  # prod(pred) = 0 = prod(true)
    assert response_scores(ScoredResponse([1, 1], [0.9, 0.6]))[2] == 1.0
    assert response_scores(ScoredResponse([1, 0], [0.9, 0.6]))[2] == 0.0
    with pytest.raises(ValueError, match="2 labels but 1"):
        ScoredResponse([1, 1], [0.5])


def test_sentence_ids_from_token_texts():
    assert sentence_ids_from_text(["there", " is", " one", ".", " it", " is", " red", "."]) == [0, 0, 0, 0, 1, 1, 1, 1]
    # '?' and '!' end sentences; a decimal point does not, whether it is its own token or not
    assert sentence_ids_from_text(["is", " it", "?", " yes", "!", " ok", "."]) == [0, 0, 0, 1, 1, 2, 2]
    assert sentence_ids_from_text(["it", " is", " 3", ".", "5", " wide", ".", " 2", "."]) == [0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert sentence_ids_from_text(["it", " is", " 3.", "5", ".", " 2."]) == [0, 0, 0, 0, 0, 1]
    # a period after a number that ends the sentence still ends it
    assert sentence_ids_from_text(["there", " are", " 2", ".", " a", " b", "."]) == [0, 0, 0, 0, 1, 1, 1]


def _random_responses(seed, n=60):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(3, 25))
        labels = (rng.random(k) > 0.15).astype(int)
        probs = np.clip(labels * 0.6 + rng.random(k) * 0.5, 0, 1)
        sids = np.cumsum(rng.random(k) < 0.2)
        out.append(ScoredResponse(labels.tolist(), probs.tolist(), sids.tolist(), taxonomy=["a", "b"][i % 2]))
    return out


def test_metrics_match_an_independent_computation_and_sklearn():
    from sklearn.metrics import average_precision_score

    rs = _random_responses(0)
    m = tldr_metrics(rs)
    y = np.concatenate([r.labels for r in rs])
    p = np.concatenate([r.probs for r in rs])
    assert m["mAP_neg"] == pytest.approx(average_precision_score(1 - y, 1 - p))
    assert m["mAP_pos"] == pytest.approx(average_precision_score(y, p))
    # A_T / A_S / A_R recomputed here from the definitions
    at, as_, ar = [], [], []
    for r in rs:
        yy, pp, ss = np.array(r.labels), (np.array(r.probs) > 0.5).astype(int), np.array(r.sentence_ids)
        at.append((yy == pp).mean())
        as_.append(np.mean([int(all(pp[ss == s])) == int(all(yy[ss == s])) for s in np.unique(ss)]))
        ar.append(int(all(pp)) == int(all(yy)))
    assert (m["A_T"], m["A_S"], m["A_R"]) == pytest.approx((np.mean(at), np.mean(as_), np.mean(ar)))
    assert m["a/n_responses"] == 30 and m["b/n_responses"] == 30
    good = np.array([all(r.labels) for r in rs])
    assert m["A_R_balanced"] == pytest.approx((np.mean(np.array(ar)[good]) + np.mean(np.array(ar)[~good])) / 2)
    assert m["a/A_T"] == pytest.approx(np.mean(at[0::2]))


def test_ap_without_its_positive_class_is_left_out():
    m = tldr_metrics([ScoredResponse([1, 1, 1], [0.9, 0.8, 0.2])])
    assert "mAP_neg" not in m and m["mAP_pos"] == 1.0


def test_hallucination_rates():
    rs = [ScoredResponse([1] * 4, [0.9, 0.1, 0.9, 0.9], [0, 0, 1, 1]), ScoredResponse([1, 1], [0.9, 0.8])]
    assert hallucination_rates(rs) == {"token": pytest.approx(1 / 6), "sentence": pytest.approx(1 / 3),
                                       "response": pytest.approx(1 / 2)}


def test_diff_labels_hand_made():
    assert diff_labels([1, 2, 3, 4], [1, 2, 9, 4]) == [1, 1, 0, 1]  # substitution
    assert diff_labels([1, 2, 3], [1, 2, 7, 8, 3]) == [1, 1, 0, 0, 1]  # insertion
    assert diff_labels([1, 2, 3, 4], [1, 4]) == [1, 0]  # pure deletion: the token after the cut
    assert diff_labels([1, 2, 3, 4], [1, 2]) == [1, 0]  # deletion at the end: the last token
    with pytest.raises(ValueError, match="not a negative"):
        diff_labels([1, 2], [1, 2])


def test_diff_labels_never_all_ones_and_marks_every_inserted_token():
    rng = np.random.default_rng(0)
    for _ in range(500):
        orig = rng.integers(0, 6, size=int(rng.integers(1, 15))).tolist()
        pert = list(orig)
        for _ in range(int(rng.integers(1, 3))):
            op = rng.integers(3)
            i = int(rng.integers(len(pert) + 1))
            if op == 0 and len(pert) > 1:
                del pert[min(i, len(pert) - 1)]
            elif op == 1:
                pert.insert(i, 99)  # a token the original never has
            elif pert:
                pert[min(i, len(pert) - 1)] = 98
        if pert == orig or not pert:
            continue
        labels = diff_labels(orig, pert)
        assert len(labels) == len(pert) and 0 in labels
        assert all(lab == 0 for t, lab in zip(pert, labels) if t in (98, 99))


def test_rate_correlation_is_pearson_across_captioners():
    rows = {"a": {"token": 0.1, "sentence": 0.2, "response": 0.3, "true_error": 0.2},
            "b": {"token": 0.2, "sentence": 0.2, "response": 0.5, "true_error": 0.4},
            "c": {"token": 0.4, "sentence": 0.2, "response": 0.4, "true_error": 0.9}}
    out = rate_correlation(rows)
    truth = np.array([0.2, 0.4, 0.9])
    for rate, x in (("token", [0.1, 0.2, 0.4]), ("response", [0.3, 0.5, 0.4])):
        xc, tc = np.array(x) - np.mean(x), truth - truth.mean()
        assert out[f"pearson_{rate}"] == pytest.approx((xc @ tc) / np.sqrt((xc @ xc) * (tc @ tc)))
    assert out["pearson_token"] == pytest.approx(0.99863, abs=1e-5)
    assert "pearson_sentence" not in out and out["n_captioners"] == 3  # a constant rate has no r
    with pytest.raises(ValueError, match="at least 3"):
        rate_correlation({"a": rows["a"], "b": rows["b"]})
