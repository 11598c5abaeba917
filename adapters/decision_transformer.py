"""Decision Transformer (HF `DecisionTransformerModel`, edbeeching format) with a persistent KV cache.

The HF example re-runs the last K steps at every env step (no cache): that is the reference row,
`train.dt.rollout_sliding_window`. Here instead each step appends its tokens to one KV cache that
lives for the whole episode — (a_{t-1}, R_t, s_t), embedded exactly as `DecisionTransformerModel.forward`
does (modality embedding + timestep embedding, then `embed_ln`, GPT-2 position ids all zero) — and the
memory policy manages that cache every `update_interval` tokens. The action is read from s_t's hidden
state, as in the model's own forward.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from adapters.base import Adapter
from transfer.memory import KVMemory


class DecisionTransformerAdapter(Adapter):
    family: ClassVar[str] = "decision_transformer"
    model_types: ClassVar[tuple[str, ...]] = ("decision_transformer",)

    @classmethod
    def from_pretrained(cls, id_or_path: str, device: str = "cpu", env_name: str | None = None) -> Any:
        from train.dt import load_dt

        return cls(load_dt(id_or_path, env_name=env_name, device=device))

    def embed(
        self, rtg: torch.Tensor, state: torch.Tensor, prev_action: torch.Tensor | None, timestep: torch.Tensor
    ) -> torch.Tensor:
        """Tokens of one env step: (a_{t-1}, R_t, s_t), or (R_0, s_0) at t = 0.

        rtg (batch,), state (batch, state_dim) normalised, prev_action (batch, act_dim), timestep (batch,)
        -> (batch, 2 or 3, hidden)
        """
        m = self.model
        time = m.embed_timestep(timestep)  # (batch, hidden)
        tokens = [m.embed_return(rtg[:, None]) + time, m.embed_state(state) + time]
        if prev_action is not None:
            prev_time = m.embed_timestep((timestep - 1).clamp(min=0))
            tokens.insert(0, m.embed_action(prev_action) + prev_time)
        return m.embed_ln(torch.stack(tokens, dim=1))

    def act(self, memory: KVMemory, tokens: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Feed one step's tokens (batch, n, hidden); returns the predicted actions (batch, act_dim).

        Finished episodes (alive False) feed padding that nobody attends to.
        """
        valid = alive[:, None].expand(-1, tokens.shape[1]).to(self.device)

        def forward(start: int, end: int, positions: torch.Tensor) -> torch.Tensor:
            hidden = self.model.encoder(
                inputs_embeds=tokens[:, start:end],
                position_ids=torch.zeros_like(positions),  # the DT's time lives in embed_timestep
                past_key_values=memory.cache,
                use_cache=True,
            ).last_hidden_state
            return hidden[:, -1]

        hidden = self.feed(memory, tokens.shape[1], forward, valid, max_chunk=tokens.shape[1])
        return self.model.predict_action(hidden)

    @torch.no_grad()
    def rollout(
        self,
        envs: list[Any],
        policy_factory: Any,
        target_return: float,
        update_interval: int,
        seed: int = 0,
        max_steps: int | None = None,
        record: bool = False,
    ) -> tuple[list[float], list[float]]:
        """Run one episode per env in lock-step with a persistent cache; returns (returns, kept fractions).

        The episode's memory stays in `self.last_memory` (with its eviction history if `record`).
        """
        from train.dt import initial_rtg, model_stats, normalize_state, update_rtg

        cfg = self.model.config
        mean, std, scale = model_stats(self.model)
        horizon = int(max_steps or cfg.max_ep_len)
        memory = self.last_memory = self.new_memory(policy_factory(), update_interval=update_interval, record=record)
        n = len(envs)
        obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
        if obs.shape[1] != cfg.state_dim:
            raise ValueError(
                f"env observation size {obs.shape[1]} does not match the model's state_dim={cfg.state_dim}"
            )
        rtg = torch.full((n,), initial_rtg(target_return, scale), device=self.device)
        returns = np.zeros(n)
        alive = torch.ones(n, dtype=torch.bool)
        action = None
        for t in range(horizon):
            state = normalize_state(torch.as_tensor(obs, dtype=torch.float32, device=self.device), mean, std)
            timestep = torch.full((n,), min(t, cfg.max_ep_len - 1), dtype=torch.long, device=self.device)
            action = self.act(memory, self.embed(rtg, state, action, timestep), alive)
            for i, env in enumerate(envs):
                if not alive[i]:
                    continue
                obs_i, r, term, trunc, _ = env.step(action[i].cpu().numpy())
                obs[i] = obs_i
                returns[i] += r
                rtg[i] = update_rtg(float(rtg[i]), r, scale)
                if term or trunc:
                    alive[i] = False
            if not alive.any():
                break
        return returns.tolist(), memory.kept_fraction().tolist()
