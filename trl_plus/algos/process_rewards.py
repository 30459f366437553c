"""Process supervision: per-token advantages from step rewards of a process reward model (PRM).

GRPO with process supervision (arXiv 2402.03300 sec. 4.1.3): completion i of a group has step rewards r_i^(j), the
j-th ending at token index idx(j). All step rewards of the group are normalized together,
r~ = (r - mean) / (std + eps) over every step of every completion in the group, and each token's advantage is the sum
of the normalized rewards of the steps that end at or after it: A_{i,t} = sum_{j : idx(j) >= t} r~_i^(j).
"""

import torch


def process_advantages(
    step_rewards: list[list[float]],
    step_end_indices: list[list[int]],
    group_size: int,
    completion_length: int,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Per-token GRPO process-supervision advantages (arXiv 2402.03300 sec. 4.1.3), `(N, T)`.

    Args:
        step_rewards: N lists, one per completion, N = num_groups * group_size with the completions of a group
            contiguous; list i holds r_i^(1..K_i), the reward of each step (K_i may differ, and may be 0).
        step_end_indices: N lists of the same lengths: idx(j), the 0-based token index, in [0, T), at which step j
            of completion i ends. Two steps ending at the same token add up.
        group_size: G, completions per prompt.
        completion_length: T, the padded completion length of the returned tensor.
        eps: added to the std, as TRL's GRPO (`(r - mean) / (std + eps)`).

    Returns:
        `(N, T)` float32 advantages: A_{i,t} = sum_{j : idx(j) >= t} r~_i^(j); 0 after completion i's last step end.

    The std uses Bessel's correction (divides by n - 1, n = the group's number of steps), as TRL's `nanstd` for
    outcome rewards, so that one step per completion reproduces TRL's GRPO outcome advantages exactly. A group with
    fewer than 2 steps has std 0 (and r - mean = 0 for a single step). A NaN step reward (unscored) is left out of
    its group's mean and std and contributes 0.

    Two completions, steps [2, 0] ending at tokens 1, 3 and [0, 0] ending at 0, 2: the group's 4 rewards have
    mean 0.5 and std sqrt(((1.5)^2 + 3 (0.5)^2) / 3) = 1, so r~ = [1.5, -0.5] and [-0.5, -0.5]:

    >>> process_advantages([[2.0, 0.0], [0.0, 0.0]], [[1, 3], [0, 2]], group_size=2, completion_length=5, eps=0.0)
    tensor([[ 1.0000,  1.0000, -0.5000, -0.5000,  0.0000],
            [-1.0000, -0.5000, -0.5000,  0.0000,  0.0000]])
    """
    num_completions = len(step_rewards)
    if len(step_end_indices) != num_completions:
        raise ValueError(
            f"step_rewards and step_end_indices must have one list per completion, got {num_completions} and "
            f"{len(step_end_indices)}."
        )
    if group_size <= 0 or num_completions % group_size != 0:
        raise ValueError(
            f"The number of completions ({num_completions}) must be a multiple of group_size ({group_size})."
        )
    if completion_length < 0:
        raise ValueError(f"completion_length must be >= 0, got {completion_length}.")

    # Flatten the steps: one entry per (completion, step), with its row, token index and group.
    rows, cols, values = [], [], []
    for i, (rewards_i, indices_i) in enumerate(zip(step_rewards, step_end_indices, strict=True)):
        if len(rewards_i) != len(indices_i):
            raise ValueError(
                f"Completion {i} has {len(rewards_i)} step rewards but {len(indices_i)} step end indices."
            )
        for reward, index in zip(rewards_i, indices_i, strict=True):
            if not 0 <= index < completion_length:
                raise ValueError(
                    f"Step end index {index} of completion {i} is outside [0, completion_length={completion_length})."
                )
            rows.append(i)
            cols.append(index)
            values.append(float(reward))

    advantages = torch.zeros(num_completions, completion_length, dtype=torch.float32)
    if not values:
        return advantages
    rows_t = torch.tensor(rows, dtype=torch.long)
    cols_t = torch.tensor(cols, dtype=torch.long)
    rewards = torch.tensor(values, dtype=torch.float32)
    groups = rows_t // group_size
    num_groups = num_completions // group_size

    # Group statistics over every scored step of every completion of the group, std with Bessel's correction.
    scored = ~torch.isnan(rewards)
    filled = torch.where(scored, rewards, 0.0)
    count = torch.zeros(num_groups).index_add_(0, groups, scored.float())
    mean = torch.zeros(num_groups).index_add_(0, groups, filled) / count.clamp(min=1.0)
    sq_dev = torch.where(scored, (rewards - mean[groups]) ** 2, 0.0)
    var = torch.zeros(num_groups).index_add_(0, groups, sq_dev) / (count - 1).clamp(min=1.0)
    std = torch.where(count > 1, var.sqrt(), 0.0)
    normalized = torch.where(scored, (rewards - mean[groups]) / (std[groups] + eps), 0.0)
    normalized = torch.nan_to_num(normalized, nan=0.0)  # 0 / 0 when eps = 0 and every step of a group is equal

    # Place each step's normalized reward at its end token, then sum from the right: A_{i,t} = sum_{idx(j) >= t}.
    advantages.index_put_((rows_t, cols_t), normalized, accumulate=True)
    return advantages.flip(-1).cumsum(-1).flip(-1)
