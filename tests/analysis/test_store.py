"""The rollout store: what generation writes, re-scoring under the generating model reproduces
the sampler's entropies and log-probs, jsonl responses, batch readers and atomic writes."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from forkrl.analysis.store import (
    RolloutStore,
    StoreWriter,
    generate_store,
    run_score,
    run_store,
    score_store,
    store_from_jsonl,
)
from forkrl.models import load_policy, save_tiny_model_dir

PROMPTS = ["1+1=", "What is 7-5?", "x=2; 3x="]
K = 2
MAX_NEW_TOKENS = 12


def length_reward(completion, example) -> float:
    return float(len(completion) % 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def policy(model_dir):
    model, tok = load_policy(model_dir, dtype="float32", device="cpu")
    return model, tok


def stops(tok):
    # Digits end a response too, so that lengths vary instead of all hitting MAX_NEW_TOKENS.
    return [tok.eos_token_id, *tok.convert_tokens_to_ids(list("0123456789"))]


def make_store(policy, path, temperature=1.0, batch_size=4):
    model, tok = policy
    return generate_store(
        model,
        tok,
        PROMPTS,
        path,
        k=K,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=temperature,
        batch_size=batch_size,
        seed=0,
        reward_fn=length_reward,
        eos_token_ids=stops(tok),
    )


@pytest.fixture(scope="module")
def store(policy, tmp_path_factory):
    return make_store(policy, tmp_path_factory.mktemp("store") / "s")


def test_generated_store_layout(store, policy):
    _, tok = policy
    samples = store.read_samples()
    tokens = pq.read_table(store.tokens_path)
    lengths = samples.column("length").to_pylist()
    assert samples.num_rows == len(PROMPTS) * K == store.num_samples
    assert samples.column("sample_id").to_pylist() == list(range(len(PROMPTS) * K))
    assert samples.column("prompt_index").to_pylist() == [i for i in range(len(PROMPTS)) for _ in range(K)]
    assert tokens.num_rows == sum(lengths) == store.num_tokens
    assert len(set(lengths)) > 1  # the digit stops make lengths differ
    # token rows: sample-major, positions 0..len-1, pieces are the decoded ids, text matches
    sample_id = tokens.column("sample_id").to_numpy()
    assert sample_id.tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]
    assert tokens.column("position").to_pylist() == [p for n in lengths for p in range(n)]
    ids = tokens.column("token_id").to_pylist()
    assert tokens.column("piece").to_pylist() == [tok.decode([i]) for i in ids]
    first = ids[: lengths[0]]
    assert samples.column("response")[0].as_py() == tok.decode(first, skip_special_tokens=True)
    assert samples.column("prompt_ids")[0].as_py() == tok(PROMPTS[0])["input_ids"]
    rewards = samples.column("reward").to_pylist()
    assert rewards == [length_reward(r, None) for r in samples.column("response").to_pylist()]
    meta = store.meta
    assert meta["num_tokens"] == store.num_tokens and meta["columns"]["entropy"]["how"] == "sampler"
    assert store.entropy_columns == ["entropy"]


def test_store_does_not_depend_on_batch_size(store, policy, tmp_path):
    other = make_store(policy, tmp_path / "b1", batch_size=1)
    np.testing.assert_array_equal(other.read_token_column("token_id"), store.read_token_column("token_id"))
    np.testing.assert_allclose(other.read_token_column("entropy"), store.read_token_column("entropy"), atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rescoring_under_the_generator_reproduces_sampler_stats(policy, tmp_path, temperature):
    model, _ = policy
    store = make_store(policy, tmp_path / "s", temperature=temperature)
    # batch_size 4 of 6 samples: one full and one partial, length-sorted batch
    score_store(store, model, "self", temperature=temperature, batch_size=4)
    assert store.entropy_columns == ["entropy", "entropy_self"]
    np.testing.assert_allclose(store.read_token_column("entropy_self"), store.read_token_column("entropy"), atol=1e-4)
    np.testing.assert_allclose(store.read_token_column("logprob_self"), store.read_token_column("logprob"), atol=1e-4)
    assert store.meta["columns"]["entropy_self"]["temperature"] == temperature


def test_rescoring_at_another_temperature_and_replacing_a_column(policy, tmp_path):
    model, _ = policy
    store = make_store(policy, tmp_path / "s")
    score_store(store, model, "hot", temperature=2.0)
    hot = store.read_token_column("entropy_hot")
    base = store.read_token_column("entropy")
    assert (hot > base).mean() > 0.9  # a flatter distribution has more entropy
    score_store(store, model, "hot", temperature=1.0)  # same name: replaced, not duplicated
    assert store.token_columns.count("entropy_hot") == 1
    np.testing.assert_allclose(store.read_token_column("entropy_hot"), base, atol=1e-4)
    with pytest.raises(ValueError, match="scoring name"):
        score_store(store, model, "a b")


def test_jsonl_responses_score_like_generation(store, policy, tmp_path):
    model, tok = policy
    samples = store.read_samples(["prompt", "response", "length"]).to_pylist()
    ids = store.read_token_column("token_id").tolist()
    offsets = np.cumsum([0] + [s["length"] for s in samples])
    path = tmp_path / "responses.jsonl"
    with open(path, "w") as f:
        for s, a, b in zip(samples, offsets[:-1], offsets[1:]):
            # the raw text, special tokens included, so that it tokenizes back to the same ids
            f.write(json.dumps({"prompt": s["prompt"], "response": tok.decode(ids[a:b])}) + "\n")
    loaded = store_from_jsonl(model, tok, path, tmp_path / "from_jsonl", batch_size=4)
    np.testing.assert_array_equal(loaded.read_token_column("token_id"), store.read_token_column("token_id"))
    np.testing.assert_allclose(loaded.read_token_column("entropy"), store.read_token_column("entropy"), atol=1e-4)
    assert loaded.read_samples(["prompt_index"]).column(0).to_pylist() == [i for i in range(3) for _ in range(K)]
    assert loaded.meta["columns"]["entropy"]["how"] == "teacher-forced"


def test_batch_reader_and_column_reader(store):
    n = 0
    for batch in store.iter_token_batches(["entropy"], batch_size=5):
        assert batch.num_rows <= 5
        n += batch.num_rows
    assert n == store.num_tokens
    assert store.read_token_column("entropy").dtype == np.float32
    assert store.resolve_column("entropy") == "entropy"
    with pytest.raises(KeyError, match="no entropy column"):
        store.resolve_column("missing")


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "s"
    with pytest.raises(RuntimeError), StoreWriter(path, {"model": "x"}) as writer:
        writer.write(
            {
                "sample_id": [0],
                "prompt_index": [0],
                "prompt": ["p"],
                "response": ["r"],
                "prompt_ids": [[1]],
                "length": [1],
                "finished": [True],
                "reward": [None],
            },
            {
                "sample_id": [0],
                "prompt_index": [0],
                "position": [0],
                "token_id": [4],
                "piece": ["r"],
                "entropy": [0.5],
                "logprob": [-0.1],
            },
        )
        raise RuntimeError("crash mid-write")
    assert list(path.iterdir()) == []  # no store files, no temporary leftovers
    with pytest.raises(FileNotFoundError, match="not a rollout store"):
        RolloutStore.open(path)


def test_run_store_and_run_score(model_dir, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "2"}) + "\n" for q in ["1+1", "4-2"]))
    summary = run_store(
        str(model_dir),
        str(tmp_path / "s"),
        data=str(data),
        k=2,
        max_new_tokens=4,
        batch_size=4,
        reward="tests.analysis.test_store:length_reward",
        dtype="float32",
        device="cpu",
    )
    assert summary["num_samples"] == 4 and 4 <= summary["num_tokens"] <= 16
    assert summary["mean_reward"] is not None
    scored = run_score(str(tmp_path / "s"), str(model_dir), "again", dtype="float32", device="cpu")
    assert scored["column"] == "entropy_again"
    assert scored["mean_entropy"]["entropy_again"] == pytest.approx(scored["mean_entropy"]["entropy"], abs=1e-4)
    with pytest.raises(ValueError, match="exactly one"):
        run_store(str(model_dir), str(tmp_path / "x"))


def test_entropy_analysis_of_a_generated_store(store, tmp_path):
    from forkrl.analysis.entropy import run_entropy

    summary = run_entropy(store, tmp_path / "out", min_count=2, top_n=20, num_responses=2)
    assert summary["num_tokens"] == store.num_tokens
    entropy = np.sort(store.read_token_column("entropy"))
    # the inverted-CDF 80th percentile is the ceil(0.8 N)-th smallest entropy
    assert summary["p80"] == float(entropy[int(np.ceil(0.8 * len(entropy))) - 1])
    page = (tmp_path / "out" / "responses.html").read_text()
    assert page.count('class="response"') == 2 and 'title="H=' in page
    assert (tmp_path / "out" / "wordcloud_high.png").stat().st_size > 1000


def test_added_columns_keep_their_place_when_replaced(tmp_path):
    from forkrl.analysis.store import add_token_columns
    from tests.analysis.crafted_store import write_store

    store = write_store(tmp_path / "s", [[(1, "a", 0.5), (2, "b", 1.5)], [(1, "a", 0.25)]])
    add_token_columns(store, {"entropy_a": np.array([1.0, 2.0, 3.0])}, {"entropy_a": {"model": "A"}})
    add_token_columns(store, {"entropy_b": np.zeros(3)})
    add_token_columns(store, {"entropy_a": np.array([4.0, 5.0, 6.0])})
    assert store.entropy_columns == ["entropy", "entropy_a", "entropy_b"]
    assert store.read_token_column("entropy_a").tolist() == [4.0, 5.0, 6.0]
    assert store.meta["columns"]["entropy_a"] == {"model": "A"}
    with pytest.raises(ValueError, match="values for 3 tokens"):
        add_token_columns(store, {"entropy_c": np.zeros(2)})
    with pytest.raises(ValueError, match="base column"):
        add_token_columns(store, {"entropy": np.zeros(3)})
