import pytest
import torch

from groundlab.shared.attention import attention
from groundlab.shared.multimodal import (
    IGNORE_INDEX,
    ChatTemplate,
    pack_batch,
    pad_batch,
    splice_features,
    token_counts,
    tokenize_conversation,
    tokenize_prompt,
)
from groundlab.shared.tokenizer import load_tokenizer

IMG = 9


def test_splice_replaces_exactly_the_placeholder_rows_in_order():
    ids = torch.tensor([[1, IMG, IMG, 5], [IMG, 3, 4, IMG]])
    embeds = torch.zeros(2, 4, 3)
    feats = torch.arange(12, dtype=torch.float).reshape(4, 3)
    out = splice_features(embeds, ids, feats, IMG)
    assert out[0, 1].tolist() == [0, 1, 2] and out[0, 2].tolist() == [3, 4, 5]
    assert out[1, 0].tolist() == [6, 7, 8] and out[1, 3].tolist() == [9, 10, 11]
    assert out[0, 0].abs().sum() == 0 and out[1, 1].abs().sum() == 0
    # per-sample list form gives the same result
    out2 = splice_features(embeds, ids, [feats[:2], feats[2:]], IMG)
    assert torch.equal(out, out2)
    assert token_counts(ids, IMG) == [2, 2]


def test_splice_gradients_flow_to_features_and_embeddings():
    ids = torch.tensor([[IMG, 2]])
    embeds = torch.randn(1, 2, 4, requires_grad=True)
    feats = torch.randn(1, 4, requires_grad=True)
    splice_features(embeds, ids, feats, IMG).sum().backward()
    assert torch.equal(feats.grad, torch.ones(1, 4))
    assert embeds.grad[0, 0].abs().sum() == 0 and torch.equal(embeds.grad[0, 1], torch.ones(4))


def test_splice_count_mismatch_raises_naming_the_counts():
    ids = torch.tensor([[IMG, IMG, 2]])
    with pytest.raises(ValueError, match="2 <image> tokens in input_ids but 3 feature rows"):
        splice_features(torch.zeros(1, 3, 4), ids, torch.zeros(3, 4), IMG)
    with pytest.raises(ValueError, match=r"sample 0: 2 \[SEG\] tokens"):
        splice_features(torch.zeros(1, 3, 4), ids, [torch.zeros(1, 4)], IMG, token_name="[SEG]")
    with pytest.raises(ValueError, match="feature width"):
        splice_features(torch.zeros(1, 3, 4), ids, torch.zeros(2, 5), IMG)


CONV = [
    {"from": "human", "value": "<image>\nwhat colour is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many shapes are there?"},
    {"from": "gpt", "value": "two"},
]


def test_conversation_labels_cover_only_assistant_answers_golden():
    tok = load_tokenizer()
    out = tokenize_conversation(tok, CONV, ChatTemplate())
    ids, labels = out["input_ids"], out["labels"]
    # The segment-wise ids equal the tokenization of the whole text (byte-level BPE boundaries agree).
    text = "USER: <image>\nwhat colour is the circle? ASSISTANT: red</s> USER: how many shapes are there? ASSISTANT: two</s>"
    assert ids == tok(text)["input_ids"]
    # ...and equal HF's chat template rendering of the same conversation.
    msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in CONV]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<s>" + text
    supervised = [tok.convert_ids_to_tokens(i) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert supervised == ["Ġred", "</s>", "Ġtwo", "</s>"]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    prompt = tokenize_prompt(tok, CONV[:1], ChatTemplate())
    assert prompt == ids[: len(prompt)]
    assert tok.decode(prompt) == "<s>USER: <image>\nwhat colour is the circle? ASSISTANT:"


def test_malformed_conversations_raise():
    tok = load_tokenizer()
    with pytest.raises(ValueError, match="turn 1: expected a assistant turn"):
        tokenize_conversation(tok, [CONV[0], CONV[0]], ChatTemplate())
    with pytest.raises(ValueError, match="unknown role"):
        tokenize_conversation(tok, [{"from": "robot", "value": "x"}], ChatTemplate())
    with pytest.raises(ValueError, match="no supervised"):
        tokenize_conversation(tok, CONV[:1], ChatTemplate())
    with pytest.raises(ValueError, match="exceeds max_length=5"):
        tokenize_conversation(tok, CONV, ChatTemplate(), max_length=5)


def test_pad_and_pack():
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}
    padded = pad_batch([a, b], pad_token_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, 9, IGNORE_INDEX]]
    left = pad_batch([a, b], pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    packed = pack_batch([a, b])
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 5] and packed["max_length_q"] == 3
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 1, 1]]
    # no token learns to predict the first token of the next sample
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert "prefix_lens" not in packed
    # PaliGemma: positions from 1, the prefix (token type 0) of each sample as prefix_lens
    pg = pack_batch([a | {"token_type_ids": [0, 0, 1]}, b | {"token_type_ids": [0, 1]}], position_offset=1)
    assert pg["position_ids"].tolist() == [[1, 2, 3, 1, 2]]
    assert pg["prefix_lens"].tolist() == [2, 1]


def test_pack_batch_fills_the_row_to_a_multiple_with_one_ignored_sequence():
    a = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}
    packed = pack_batch([a, b], pad_to_multiple_of=4, pad_token_id=0)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9] + [IGNORE_INDEX] * 3]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert packed["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and packed["max_length_q"] == 3
    pg = pack_batch([a | {"token_type_ids": [0, 0, 1]}, b | {"token_type_ids": [0, 1]}], position_offset=1,
                    pad_to_multiple_of=8, pad_token_id=0)
    assert pg["prefix_lens"].tolist() == [2, 1, 0] and pg["input_ids"].shape == (1, 8)
    assert pack_batch([a, b], pad_to_multiple_of=5)["input_ids"].shape == (1, 5)  # already a multiple
    with pytest.raises(ValueError, match="pad_token_id"):
        pack_batch([a, b], pad_to_multiple_of=4)
    with pytest.raises(ValueError, match=">= 1"):
        pack_batch([a, b], pad_to_multiple_of=0)


def test_pack_batch_rejects_what_it_cannot_pack():
    with pytest.raises(ValueError, match="empty batch"):
        pack_batch([])
    with pytest.raises(ValueError, match="sample 1"):
        pack_batch([{"input_ids": [1]}, {"input_ids": []}])
    with pytest.raises(ValueError, match="2 labels for 3"):
        pack_batch([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="prefix of 0s then 1s"):
        pack_batch([{"input_ids": [1, 2, 3], "token_type_ids": [0, 1, 0]}])
    with pytest.raises(ValueError, match="every sample"):
        pack_batch([{"input_ids": [1, 2], "token_type_ids": [0, 1]}, {"input_ids": [3]}])


def test_packed_batch_drives_packed_attention():
    packed = pack_batch([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 2, 4, generator=g)
    out = attention(q, q, q, position_ids=packed["position_ids"])
    alone = attention(q[3:], q[3:], q[3:], cu_seqlens=torch.tensor([0, 2], dtype=torch.int32))
    torch.testing.assert_close(out[3:], alone)


def test_expand_token_repeats_placeholders_without_supervising_them():
    from groundlab.shared.multimodal import expand_token

    out = expand_token({"input_ids": [1, IMG, 5, 6], "labels": [IGNORE_INDEX, IGNORE_INDEX, 5, 6]}, IMG, 3)
    assert out["input_ids"] == [1, IMG, IMG, IMG, 5, 6]
    assert out["labels"] == [IGNORE_INDEX] * 4 + [5, 6]
    assert expand_token({"input_ids": [IMG, 2]}, IMG, 2) == {"input_ids": [IMG, IMG, 2]}
