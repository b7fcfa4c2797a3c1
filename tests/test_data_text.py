"""Raw text beside XMC data: tokens, vocabulary, package tables, and the debian-depends text."""
import numpy as np
import pytest

from jaxidx.data import text
from jaxidx.data.specs import xmc_data_dir, load


def test_tokenize_vocab_encode():
    texts = ["Lib-Foo 1.2: the FOO library", "foo tools", "bar"]
    assert text.tokenize(texts[0]) == ["lib", "foo", "1", "2", "the", "foo", "library"]
    vocab = text.build_vocab(texts, min_count=1)
    assert vocab["foo"] == 2 and min(vocab.values()) == 2  # most frequent first, after PAD and UNK
    assert list(vocab) == ["foo", "1", "2", "bar", "lib", "library", "the", "tools"]  # ties by token
    assert text.build_vocab(texts, min_count=2) == {"foo": 2}
    ids = text.encode(["foo bar zzz", "", "foo foo foo foo"], vocab, max_len=3)
    np.testing.assert_array_equal(ids, [[2, vocab["bar"], text.UNK], [0, 0, 0], [2, 2, 2]])
    assert ids.dtype == np.int32


def _table(d, rows, header="package\tsection\tshort_description\tdepends\tdebtags"):
    (d / "packages.tsv").write_text(header + "\n" + "".join(r + "\n" for r in rows))


def test_package_texts_and_errors_name_file_and_line(tmp_path):
    assert text.read_package_texts(tmp_path, "train") is None  # no text: nothing to read
    _table(tmp_path, ["a\tx\tAlpha tool\t\t", "b\ty\tBeta lib\tc\t"])
    (tmp_path / "train_packages.txt").write_text("b\na\n")
    assert text.read_package_texts(tmp_path, "train") == ["b Beta lib", "a Alpha tool"]
    (tmp_path / "train_packages.txt").write_text("b\nzz\n")
    with pytest.raises(ValueError, match=r"train_packages.txt:2: package 'zz' is not in packages.tsv"):
        text.read_package_texts(tmp_path, "train")
    _table(tmp_path, ["a\tx\tAlpha tool", "b\ty\tBeta lib\tc\t"])
    with pytest.raises(ValueError, match=r"packages.tsv:2: 3 tab-separated fields, the header has 5"):
        text.read_package_texts(tmp_path, "train")
    _table(tmp_path, ["a\tAlpha"], header="package\tdescription")
    with pytest.raises(ValueError, match=r"packages.tsv:1: header lacks the column\(s\) section, short_description"):
        text.read_package_texts(tmp_path, "train")


@pytest.mark.skipif(not (xmc_data_dir() / "debian-depends" / "packages.tsv").is_file(), reason="no shared data")
def test_debian_depends_has_tokens_of_name_and_description():
    data = load("debian-depends")
    assert data.tokens_train.shape == (data.X_train.shape[0], 32) and data.tokens_test.shape[0] == data.X_test.shape[0]
    assert data.vocab_size > 1000 and data.tokens_train.max() < data.vocab_size
    assert (data.tokens_train[:, 0] > 0).all()  # every package has at least its name
    names = (xmc_data_dir() / "debian-depends" / "train_packages.txt").read_text().split("\n")
    assert names[0] == "0ad" and data.tokens_train[0, 0] >= 2
