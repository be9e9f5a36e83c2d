"""MovieLens loaders (all formats) and the verified downloader (offline, file:// URLs)."""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedrecon_fast import movielens, textparse
from fedrecon_fast.movielens import download_movielens, load_movielens

# (user, item, rating, timestamp); user 7 rates item 30 twice over time, ids unsorted
ROWS = [
    (7, 30, 4, 978300760),
    (1, 1193, 5, 978300019),
    (7, 5, 3, 978300001),
    (1, 661, 3, 978302109),
    (12, 30, 1, 978301968),
    (7, 914, 2, 978300002),
]
HALF_STAR_ROWS = [
    (1, 122, 5.0, 838985046),
    (1, 185, 4.5, 838983525),
    (2, 122, 0.5, 868245777),
    (2, 292, 3.5, 868244562),
    (3, 185, 2.0, 1136075494),
]


def write(path: Path, text: str, mode="w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, newline="") as fh:
        fh.write(text)
    return path


def fmt(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def u_data(rows):
    return "".join(f"{u}\t{i}\t{fmt(r)}\t{t}\n" for u, i, r, t in rows)


def ratings_dat(rows):
    return "".join(f"{u}::{i}::{fmt(r)}::{t}\n" for u, i, r, t in rows)


def ratings_csv(rows):
    return "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{float(r):.1f},{t}\n" for u, i, r, t in rows)


def expected_triples(rows):
    return sorted((u, i, float(r), t) for u, i, r, t in rows)


def loaded_triples(data):
    u, i, r = data.to_coo()
    return sorted(zip(data.user_ids[u].tolist(), data.item_ids[i].tolist(), r.tolist(), data.timestamps.tolist()))


def check_loaded(data, rows):
    assert loaded_triples(data) == expected_triples(rows)
    np.testing.assert_array_equal(data.user_ids, sorted({r[0] for r in rows}))
    np.testing.assert_array_equal(data.item_ids, sorted({r[1] for r in rows}))
    assert data.timestamps is not None and data.timestamps.dtype == np.int64
    for k in range(data.num_clients):  # chronological within each user
        assert np.all(np.diff(data.timestamps[data.indptr[k] : data.indptr[k + 1]]) >= 0)


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "name, writer, rows",
    [
        ("u.data", u_data, ROWS),
        ("ratings.dat", ratings_dat, ROWS),
        ("ratings.dat", ratings_dat, HALF_STAR_ROWS),
        ("ratings.csv", ratings_csv, ROWS),
        ("ratings.csv", ratings_csv, HALF_STAR_ROWS),
    ],
)
def test_load_each_format_from_folder_and_file(tmp_path, name, writer, rows):
    path = write(tmp_path / "ml" / name, writer(rows))
    for target in (path.parent, path, str(path)):
        check_loaded(load_movielens(target), rows)


def test_half_star_ratings_are_exact(tmp_path):
    data = load_movielens(write(tmp_path / "ratings.dat", ratings_dat(HALF_STAR_ROWS)))
    assert sorted(data.ratings.tolist()) == sorted(r for _, _, r, _ in HALF_STAR_ROWS)


def test_loaded_order_and_values(tmp_path):
    data = load_movielens(write(tmp_path / "ratings.dat", ratings_dat(ROWS)))
    np.testing.assert_array_equal(data.user_ids, [1, 7, 12])
    np.testing.assert_array_equal(data.indptr, [0, 2, 5, 6])
    # user 7: timestamps 978300001 (item 5), 978300002 (914), 978300760 (30)
    np.testing.assert_array_equal(data.item_ids[data.items[2:5]], [5, 914, 30])
    np.testing.assert_array_equal(data.ratings[2:5], [3, 2, 4])


def test_folder_preference_order(tmp_path):
    write(tmp_path / "ratings.csv", ratings_csv(HALF_STAR_ROWS))
    write(tmp_path / "ratings.dat", ratings_dat(ROWS[:3]))
    assert load_movielens(tmp_path).nnz == 3
    write(tmp_path / "u.data", u_data(ROWS[:2]))
    assert load_movielens(tmp_path).nnz == 2


def test_unknown_file_name_is_sniffed(tmp_path):
    check_loaded(load_movielens(write(tmp_path / "my.txt", ratings_dat(ROWS))), ROWS)
    check_loaded(load_movielens(write(tmp_path / "x.tsv", u_data(ROWS))), ROWS)
    check_loaded(load_movielens(write(tmp_path / "x.csv", ratings_csv(ROWS))), ROWS)


def test_crlf_blank_lines_bom_and_missing_final_newline(tmp_path):
    text = ratings_csv(ROWS).replace("\n", "\r\n")
    text = "\ufeff" + text.replace("\r\n", "\r\n\r\n", 1).rstrip("\r\n")
    path = write(tmp_path / "ratings.csv", text, mode="w")
    check_loaded(load_movielens(path), ROWS)
    dat = write(tmp_path / "d" / "ratings.dat", ratings_dat(ROWS).rstrip("\n") + "\n\n")
    check_loaded(load_movielens(dat), ROWS)


def test_empty_file_gives_empty_data(tmp_path):
    data = load_movielens(write(tmp_path / "ratings.dat", ""))
    assert (data.num_clients, data.nnz) == (0, 0)
    header_only = load_movielens(write(tmp_path / "c" / "ratings.csv", "userId,movieId,rating,timestamp\n"))
    assert header_only.nnz == 0


def test_many_blocks_match_one_block(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rows = [
        (int(u), int(i), float(r) / 2, int(t))
        for u, i, r, t in zip(
            rng.integers(1, 50, 3000),
            rng.integers(1, 400, 3000),
            rng.integers(1, 11, 3000),
            rng.integers(9 * 10**8, 10**9, 3000),
        )
    ]
    path = write(tmp_path / "ratings.dat", ratings_dat(rows))
    whole = load_movielens(path)
    monkeypatch.setattr(textparse, "BLOCK_BYTES", 97)
    blocks = load_movielens(path)
    for name in ("indptr", "items", "ratings", "timestamps", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(blocks, name))
    assert whole.nnz == 3000


# --------------------------------------------------------------------------- errors


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_movielens(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="ratings.dat") as info:
        load_movielens(tmp_path / "empty")
    assert "u.data" in str(info.value) and "ratings.csv" in str(info.value)
    assert "empty" in str(info.value)


MALFORMED = [
    ("ratings.dat", "1::2::3::4\n5::6::7\n", 2, "expected 4 fields"),
    ("ratings.dat", "1::2::3::4\n1::2::3::4::5\n", 2, "expected 4 fields"),
    ("ratings.dat", "1::2::3::4\n\n1::2::x::4\n", 3, "rating"),
    ("ratings.dat", "1::2::3::4\n1::2::nan::4\n", 2, "rating"),
    ("ratings.dat", "1::2::3::4\n1::2::3::4\n1::2::inf::4\n", 3, "rating"),
    ("ratings.dat", "1::2::3::4\n1:::2::3::4\n", 2, "item id"),
    ("ratings.dat", "1::2::3::4\n1::::3::4\n", 2, "item id"),
    ("ratings.dat", "1::2::3::4\n1::2::3::4.5\n", 2, "timestamp"),
    ("ratings.dat", "1::2::3::4\n1.0::2::3::4\n", 2, "user id"),
    ("ratings.dat", "1::2::3::4\n1\t2\t3\t4\n", 2, "expected 4 fields"),
    ("u.data", "1\t2\t3\t4\n1\t2\t3\t4\n-1\t2\t3\t4\n", 3, "user id"),
    ("u.data", "1\t2\t3\t4\n1 2 3 4\n", 2, "expected 4 fields"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,4\n1,2,,4\n", 3, "rating"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,4\n1,2,3.5\n", 3, "expected 4 fields"),
    ("ratings.csv", "movieId,userId,rating,timestamp\n2,1,3.5,4\n", 1, "header"),
]


@pytest.mark.parametrize("name, text, line, reason", MALFORMED)
def test_malformed_content_names_file_and_line(tmp_path, name, text, line, reason):
    path = write(tmp_path / name, text)
    with pytest.raises(ValueError, match=reason) as info:
        load_movielens(path)
    message = str(info.value)
    assert str(path) in message
    assert f"line {line}:" in message


def test_error_line_number_in_a_later_block(tmp_path, monkeypatch):
    lines = [f"{u}::{u + 1}::3::{10**9 + u}" for u in range(1, 200)]
    lines[150] = "151::152::three::1000000151"
    path = write(tmp_path / "ratings.dat", "\n".join(lines) + "\n")
    monkeypatch.setattr(textparse, "BLOCK_BYTES", 256)
    with pytest.raises(ValueError, match="line 151: rating"):
        load_movielens(path)
    lines[150] = "151::152::3"
    write(path, "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 151: expected 4 fields"):
        load_movielens(path)


# --------------------------------------------------------------------------- real data


def ml1m_folder() -> Path:
    env = os.environ.get("FEDRECON_ML1M")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"


@pytest.mark.skipif(
    not (ml1m_folder() / "ratings.dat").is_file(), reason="MovieLens 1M not available (set FEDRECON_ML1M to its folder)"
)
def test_real_movielens_1m():
    folder = ml1m_folder()
    with open(folder / "ratings.dat", "rb") as fh:
        raw = fh.read()
    n_lines = raw.count(b"\n")
    first = [int(x) for x in raw.split(b"\n", 1)[0].split(b"::")]
    t0 = time.perf_counter()
    data = load_movielens(folder)
    elapsed = time.perf_counter() - t0
    assert data.nnz == n_lines  # 487,650 for users 1-2999, 1,000,209 for the full file
    assert data.user_ids[0] == 1 and np.all(np.diff(data.user_ids) > 0)
    assert data.sizes.min() >= 20  # every ML-1M user has at least 20 ratings
    assert set(np.unique(data.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    # the file's first line is user 1's rating of movie 1193 (5 stars)
    row = data.indptr[0] + np.flatnonzero(data.item_ids[data.items[: data.indptr[1]]] == first[1])
    assert data.ratings[row].tolist() == [first[2]] and data.timestamps[row].tolist() == [first[3]]
    assert elapsed < 5.0  # generous bound; typically ~0.1 s


# --------------------------------------------------------------------------- download


def make_zip(path: Path, members: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            if name.endswith("/"):
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, text)
    return path


def digest(path: Path, algo: str) -> str:
    return hashlib.new(algo, path.read_bytes()).hexdigest()


def leftovers(dest: Path):
    return sorted(p.name for p in dest.iterdir() if p.name.startswith("."))


@pytest.fixture
def release_zip(tmp_path):
    return make_zip(
        tmp_path / "src" / "ml-1m.zip", {"ml-1m/": "", "ml-1m/ratings.dat": ratings_dat(ROWS), "ml-1m/README": "terms"}
    )


@pytest.mark.parametrize("algo", ["sha256", "md5"])
def test_download_verifies_and_extracts(tmp_path, release_zip, algo):
    dest = tmp_path / "dest"
    folder = download_movielens("ml-1m", dest, url=release_zip.as_uri(), **{algo: digest(release_zip, algo).upper()})
    assert folder == dest / "ml-1m"
    assert (folder / "README").read_text() == "terms"
    check_loaded(load_movielens(folder), ROWS)
    assert (dest / "ml-1m.zip").read_bytes() == release_zip.read_bytes()
    assert leftovers(dest) == []


def test_download_reuses_verified_zip_and_extraction(tmp_path, release_zip):
    dest = tmp_path / "dest"
    sha = digest(release_zip, "sha256")
    folder = download_movielens("ml-1m", dest, url=release_zip.as_uri(), sha256=sha)
    release_zip.unlink()  # a second call must not need the source
    assert download_movielens("ml-1m", dest, url=release_zip.as_uri(), sha256=sha) == folder
    (folder / "ratings.dat").unlink()  # re-extracted from the cached zip
    assert download_movielens("ml-1m", dest, url=release_zip.as_uri(), sha256=sha) == folder
    check_loaded(load_movielens(folder), ROWS)


def test_download_checksum_mismatch_deletes_the_download(tmp_path, release_zip):
    dest = tmp_path / "dest"
    wrong = "0" * 64
    with pytest.raises(ValueError, match="checksum mismatch") as info:
        download_movielens("ml-1m", dest, url=release_zip.as_uri(), sha256=wrong)
    message = str(info.value)
    assert wrong in message and digest(release_zip, "sha256") in message
    assert list(dest.iterdir()) == []  # neither the zip nor a temporary file remains
    with pytest.raises(ValueError, match="md5"):
        download_movielens("ml-1m", dest, url=release_zip.as_uri(), md5="f" * 32)
    assert list(dest.iterdir()) == []


def test_download_uses_builtin_checksums(tmp_path, release_zip):
    # our test zip is not the official ml-100k release, so the built-in digest must reject it
    with pytest.raises(ValueError, match=movielens.MOVIELENS_CHECKSUMS["ml-100k"]["sha256"]):
        download_movielens("ml-100k", tmp_path / "dest", url=release_zip.as_uri())
    with pytest.raises(ValueError, match=movielens.MOVIELENS_CHECKSUMS["ml-10m"]["md5"]):
        download_movielens("ml-10m", tmp_path / "dest", url=release_zip.as_uri())


def test_download_refuses_without_any_checksum(tmp_path, release_zip, monkeypatch):
    monkeypatch.delitem(movielens.MOVIELENS_CHECKSUMS, "ml-1m")
    with pytest.raises(ValueError, match="sha256="):
        download_movielens("ml-1m", tmp_path / "dest", url=release_zip.as_uri())
    assert not (tmp_path / "dest" / "ml-1m.zip").exists()


@pytest.mark.parametrize(
    "member", ["../evil.txt", "ml-1m/../../evil.txt", "/tmp/evil.txt", "..\\evil.txt", "C:/evil.txt"]
)
def test_download_rejects_unsafe_members(tmp_path, member):
    src = make_zip(tmp_path / "src" / "ml-1m.zip", {"ml-1m/ratings.dat": ratings_dat(ROWS), member: "pwned"})
    dest = tmp_path / "a" / "dest"
    with pytest.raises(ValueError, match="unsafe member"):
        download_movielens("ml-1m", dest, url=src.as_uri(), sha256=digest(src, "sha256"))
    assert not (dest / "ml-1m").exists()  # nothing extracted
    assert not (tmp_path / "a" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert leftovers(dest) == []


def test_download_finds_the_ratings_folder_and_rejects_archives_without_one(tmp_path):
    src = make_zip(
        tmp_path / "src" / "ml-10m.zip",
        {"ml-10M100K/ratings.dat": ratings_dat(HALF_STAR_ROWS), "ml-10M100K/tags.dat": ""},
    )
    folder = download_movielens("ml-10m", tmp_path / "d1", url=src.as_uri(), md5=digest(src, "md5"))
    assert folder == tmp_path / "d1" / "ml-10M100K"
    check_loaded(load_movielens(folder), HALF_STAR_ROWS)
    empty = make_zip(tmp_path / "src2" / "ml-1m.zip", {"ml-1m/README": "x"})
    with pytest.raises(ValueError, match="no MovieLens ratings file"):
        download_movielens("ml-1m", tmp_path / "d2", url=empty.as_uri(), sha256=digest(empty, "sha256"))


def test_download_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="ml-2m"):
        download_movielens("ml-2m", tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        download_movielens("ml-1m", tmp_path, sha256="abc")
    with pytest.raises(ValueError, match="md5"):
        download_movielens("ml-1m", tmp_path, md5="z" * 32)


def test_checksum_table_and_urls_are_well_formed():
    assert set(movielens.MOVIELENS_URLS) == {"ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-latest-small"}
    for name, url in movielens.MOVIELENS_URLS.items():
        assert url == f"https://files.grouplens.org/datasets/movielens/{name}.zip"
        known = movielens.MOVIELENS_CHECKSUMS[name]
        assert known
        for algo, value in known.items():
            assert len(value) == {"md5": 32, "sha256": 64}[algo]
            int(value, 16)
