import json

from groundlab.shared.tokenizer import IMAGE_TOKEN, build_tokenizer, fixture_dir, load_tokenizer
from groundlab.shared.world import World, WorldConfig, vocabulary


def test_fixture_equals_a_fresh_build():
    fresh = json.loads(build_tokenizer().backend_tokenizer.to_str())
    stored = json.loads((fixture_dir() / "tokenizer.json").read_text())
    assert fresh["model"]["vocab"] == stored["model"]["vocab"]
    assert fresh["model"]["merges"] == stored["model"]["merges"]


def test_every_world_word_is_one_token_and_specials_are_atomic():
    tok = load_tokenizer()
    for word in vocabulary(WorldConfig()):
        for text in (" " + word, "\n" + word):  # after a space (chat layout) and after a newline (PaliGemma)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 + text.startswith("\n"), (word, tok.convert_ids_to_tokens(ids))
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    ids = tok(f"x{IMAGE_TOKEN}y</s>", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) in ids and tok.eos_token_id in ids
    assert len(tok) < 1100  # a tiny embedding table


def test_world_texts_round_trip_and_any_text_encodes():
    tok = load_tokenizer()
    scenes = World(seed=9).scenes("test", 30)
    texts = [s.caption for s in scenes] + [q.question for s in scenes for q in s.qa]
    texts += ["Unseen words: zebra, Ünïcödé, 42!"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.unk_token_id not in ids
    # A world caption costs one token per word or punctuation mark.
    cap = scenes[0].caption
    n_words = len(cap.replace(",", " ,").replace(".", " .").split())
    assert len(tok(cap, add_special_tokens=False)["input_ids"]) == n_words


def test_extra_special_tokens_get_new_ids_and_stay_atomic():
    tok = load_tokenizer(["[SEG]", "<region>", "<mark>"])
    base = len(load_tokenizer())
    ids = tok.convert_tokens_to_ids(["[SEG]", "<region>", "<mark>"])
    assert sorted(ids) == [base, base + 1, base + 2]
    enc = tok(" it is [SEG].", add_special_tokens=False)["input_ids"]
    assert ids[0] in enc
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == load_tokenizer().convert_tokens_to_ids(IMAGE_TOKEN)
