"""The rollout store: what generation writes, re-scoring under the generating model reproduces
the sampler's entropies and log-probs, jsonl responses, batch readers and atomic writes."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from forkrl.analysis.store import (
    RolloutStore,
    StoreOptions,
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
    options = StoreOptions(
        k=K,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=temperature,
        batch_size=batch_size,
        seed=0,
        reward=length_reward,
        eos_token_ids=stops(tok),
    )
    return generate_store(model, tok, PROMPTS, path, options)


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
    loaded = store_from_jsonl(model, tok, path, tmp_path / "from_jsonl", StoreOptions(batch_size=4))
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
        options=StoreOptions(k=2, max_new_tokens=4, batch_size=4, reward="tests.analysis.test_store:length_reward"),
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


def text_length(completion, example) -> float:
    return float(len(completion))


class ScriptedBackend:
    """A `GenerationBackend` without a model: the response to a prompt is its tokens reversed, then
    EOS if that fits in `max_new_tokens`; token t (0-based) has entropy 0.5 (t + 1) and log-prob
    -0.25 (t + 1). It records every call."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = []

    def generate(self, prompts, params):
        import torch

        from forkrl.rollout.base import Rollout

        self.calls.append((list(prompts), params))
        tok = self.tokenizer
        prompt_ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
        responses = [(p[::-1] + [tok.eos_token_id])[: params.max_new_tokens] for p in prompt_ids]
        B, P, R = len(prompts), max(map(len, prompt_ids)), max(map(len, responses))
        out = {
            name: torch.zeros(B, size, dtype=torch.long) for name, size in [("pi", P), ("pm", P), ("ri", R), ("rm", R)]
        }
        out["pi"].fill_(tok.pad_token_id)
        out["ri"].fill_(tok.pad_token_id)
        for b, (p, r) in enumerate(zip(prompt_ids, responses)):
            out["pi"][b, P - len(p) :], out["pm"][b, P - len(p) :] = torch.tensor(p), 1
            out["ri"][b, : len(r)], out["rm"][b, : len(r)] = torch.tensor(r), 1
        steps = torch.arange(1, R + 1, dtype=torch.float32).expand(B, R) * out["rm"]
        return Rollout(
            prompt_ids=out["pi"],
            prompt_mask=out["pm"],
            response_ids=out["ri"],
            response_mask=out["rm"],
            sampler_logprobs=-0.25 * steps,
            sampler_entropy=0.5 * steps,
            finished=torch.tensor([r[-1] == tok.eos_token_id for r in responses]),
            response_lengths=out["rm"].sum(1),
        )

    def update_weights(self, model) -> None:
        pass


def test_generation_goes_through_any_backend(tmp_path):
    from forkrl.analysis.store.generate import _sample_seed
    from forkrl.models import build_tiny_tokenizer
    from forkrl.rollout.base import GenerationBackend

    tok = build_tiny_tokenizer()
    backend = ScriptedBackend(tok)
    assert isinstance(backend, GenerationBackend)
    options = StoreOptions(k=2, max_new_tokens=4, temperature=0.7, batch_size=3, seed=7, reward=text_length)
    # no model at all: the backend is the only thing that samples
    store = generate_store(None, tok, ["ab", "hello"], tmp_path / "s", options, backend=backend, model_name="scripted")

    # 4 samples (sample_id = prompt * k + j) in batches of 3: ids 0-2, then 3, each with its row seed
    assert [prompts for prompts, _ in backend.calls] == [["ab", "ab", "hello"], ["hello"]]
    assert [params.row_seeds for _, params in backend.calls] == [
        [_sample_seed(7, 0), _sample_seed(7, 1), _sample_seed(7, 2)],
        [_sample_seed(7, 3)],
    ]
    assert all(p.max_new_tokens == 4 and p.temperature == 0.7 for _, p in backend.calls)

    # "ab" -> "b", "a", EOS (3 tokens, finished); "hello" -> "o", "l", "l", "e" (cut at 4, unfinished)
    samples = store.read_samples().to_pydict()
    assert samples["sample_id"] == [0, 1, 2, 3] and samples["prompt_index"] == [0, 0, 1, 1]
    assert samples["response"] == ["ba", "ba", "olle", "olle"]  # EOS is a special token: not in the text
    assert samples["length"] == [3, 3, 4, 4]
    assert samples["finished"] == [True, True, False, False]
    assert samples["prompt_ids"] == [tok("ab")["input_ids"]] * 2 + [tok("hello")["input_ids"]] * 2
    assert samples["reward"] == [2.0, 2.0, 4.0, 4.0]  # text_length of the response texts
    tokens = pq.read_table(store.tokens_path).to_pydict()
    ab = [*tok("ba")["input_ids"], tok.eos_token_id]
    olle = tok("olle")["input_ids"]
    assert tokens["token_id"] == ab + ab + olle + olle
    assert tokens["piece"] == ["b", "a", tok.eos_token, "b", "a", tok.eos_token] + list("olleolle")
    assert tokens["position"] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]
    assert tokens["entropy"] == [0.5, 1.0, 1.5] * 2 + [0.5, 1.0, 1.5, 2.0] * 2  # the backend's values, exactly
    assert tokens["logprob"] == [-0.25, -0.5, -0.75] * 2 + [-0.25, -0.5, -0.75, -1.0] * 2
    meta = store.meta
    assert meta["model"] == "scripted" and meta["k"] == 2 and meta["reward"] == "text_length"
    assert meta["columns"]["entropy"] == {"model": "scripted", "temperature": 0.7, "how": "sampler"}

    with pytest.raises(ValueError, match="eos_token_ids"):
        generate_store(None, tok, ["ab"], tmp_path / "x", StoreOptions(eos_token_ids=[0]), backend=backend)
    with pytest.raises(ValueError, match="pass a model or a backend"):
        generate_store(None, tok, ["ab"], tmp_path / "y")
