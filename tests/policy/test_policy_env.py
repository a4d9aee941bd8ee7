"""The gymnasium env: passes gymnasium's checker; its return is exactly P - ρ·(episode seconds)."""

import pytest
from gymnasium.utils.env_checker import check_env

from vllm_respsp.policy.cost import load_cost_model
from vllm_respsp.policy.env import TraceEnv
from vllm_respsp.policy.simulator import simulate
from vllm_respsp.policy.traces import synthetic_traces
from vllm_respsp.tree.shape import TreeShape, chain

ACTIONS = [chain(1), chain(3), TreeShape(8, 3, 4), TreeShape(32, 6, 8)]


@pytest.fixture(scope="module")
def setup():
    traces = synthetic_traces(ACTIONS, num_generations=2, positions=50, hidden_size=3, seed=0)
    return traces, load_cost_model("cpu-smollm2-135m")


@pytest.mark.filterwarnings("ignore:.*infinity")  # hidden states are unbounded on purpose
def test_gymnasium_env_checker(setup):
    check_env(TraceEnv(*setup, batch_loads=(1, 8, 64), hold=2), skip_render_check=True)


@pytest.mark.parametrize("hold", [1, 3])
def test_return_is_tokens_minus_reference_time(setup, hold):
    traces, cost = setup
    env = TraceEnv(traces, cost, batch_loads=(8,), hold=hold)
    obs, info = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape and info["batch"] == 8
    total, tokens, seconds, done = 0.0, 0.0, 0.0, False
    while not done:
        obs, reward, done, truncated, info = env.step(2)
        total, tokens, seconds = total + reward, tokens + info["tokens"], seconds + info["seconds"]
        assert not truncated
    P = env._gen.num_positions
    assert tokens == P
    assert total == pytest.approx(P - env.reference_rates[8] * seconds)
    # the same walk in the simulator, restricted to this generation, costs the same time
    one = type(traces)(traces.actions, traces.feature_spec, [env._gen])
    assert simulate(one, cost, 2, batch=8).seconds == pytest.approx(seconds)


def test_batch_load_is_sampled_per_episode(setup):
    env = TraceEnv(*setup, batch_loads=(1, 8, 64))
    seen = {env.reset(seed=s)[1]["batch"] for s in range(30)}
    assert seen == {1, 8, 64}
    # the batch load is in the observation (log2(batch) / 6)
    obs, info = env.reset(seed=1, options={"batch": 64})
    assert obs[-2] == pytest.approx(1.0)


def test_windows_start_anywhere_and_truncate(setup):
    traces, cost = setup
    env = TraceEnv(traces, cost, batch_loads=(1,), episode_steps=4)
    starts = set()
    for s in range(20):
        env.reset(seed=s)
        starts.add(env._pos)
        steps, done = 0, False
        while not done:
            _, _, terminated, truncated, _ = env.step(0)
            steps, done = steps + 1, terminated or truncated
            assert not (terminated and truncated)
        assert steps <= 4 and (steps == 4 or terminated)
    assert len(starts) > 5
