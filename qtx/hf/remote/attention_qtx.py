"""The math of qtx's attention variants in PyTorch, shipped next to ``modeling_qtx.py``.

``config.qtx_attention`` (see configuration_qtx.py) selects the normaliser of the masked scores
``x`` (B, H, T, S) over the keys each query may see (``allowed``, bool):

* ``vanilla`` softmax; ``clipped``: ``clip((zeta - gamma) softmax(x) + gamma, 0, 1)`` (with
  ``alpha``: ``gamma = -alpha / T``, ``T = softmax_T`` or the key length, ``zeta = 1``);
* ``normalized_clipped``: ``clip((1 + alpha / n_i) softmax(x) - alpha / n_i, 0, 1)``, ``n_i``
  the number of keys query ``i`` sees (at least 1);
* ``off_by_one``: ``e^{x_i} / (1 + sum_j e^{x_j})``;
* ``sink``: ``e^{x_i} / (e^{s_h} + sum_j e^{x_j})``, ``s_h`` one learned logit per head;
* ``softpick``: ``relu(e^{x_i} - 1) / (sum_j |e^{x_j} - 1| + eps)`` over the allowed keys only
  (rows may be all zero), computed shifted by the row max ``m``:
  ``relu(e^{x-m} - e^{-m}) / (sum |e^{x-m} - e^{-m}| + eps e^{-m})``.

and the gate ``pi`` that multiplies each head's output, from the attention input x (B, T, D):
``linear`` (per head, ``Linear(D/H -> 1)`` on the head's slice of x), ``mlp`` / ``mlp_wide``
(``D/H -> D/H/4`` (or ``D/H``) ``-> 1`` with ReLU), ``all_heads_linear`` (``Linear(D -> H)``),
``headwise`` / ``elementwise`` (the output gate ``sigmoid(x W (+ b))``, W (H, D) or (H*Dh, D),
a bias only with ``pi_init``); ``gate_condition`` ``head`` mean-pools the logits over the real
tokens (causal models: a running mean over positions <= t), ``none`` is one learned logit per
head; ``pi = sigmoid(logits)``, divided by ``pi_init`` for fine-tuning gates.
"""

import torch
from torch import nn

SOFTMAXES = ("vanilla", "clipped", "normalized_clipped", "off_by_one", "sink", "softpick")
OUTPUT_GATES = ("headwise", "elementwise")
GATES = ("none", "linear", "mlp", "mlp_wide", "all_heads_linear", *OUTPUT_GATES)
GATE_CONDITIONS = ("token", "head", "none")
DEFAULTS = {
    "softmax": "vanilla",
    "gamma": 0.0,
    "zeta": 1.0,
    "alpha": None,
    "softmax_T": None,
    "gate": "none",
    "gate_condition": "token",
    "pi_init": None,
    "gate_finetune": False,
    "gate_init_std": None,
    "sink_init": 0.0,
    "softpick_eps": 1e-6,
}


def attention_settings(config) -> dict:
    """``config.qtx_attention`` with defaults, validated (one error naming the field)."""
    a = dict(DEFAULTS)
    a.update(dict(getattr(config, "qtx_attention", None) or {}))
    for field, allowed in (
        ("softmax", SOFTMAXES),
        ("gate", GATES),
        ("gate_condition", GATE_CONDITIONS),
    ):
        if a[field] not in allowed:
            raise ValueError(f"qtx_attention.{field}={a[field]!r}; allowed: {', '.join(allowed)}.")
    if a["gate_finetune"] and not a["pi_init"]:
        raise ValueError("qtx_attention.pi_init must be in (0, 1) when gate_finetune is true.")
    if a["gate"] in OUTPUT_GATES and a["gate_condition"] != "token":
        raise ValueError(f"qtx_attention.gate_condition must be 'token' with gate={a['gate']!r}.")
    if a["softmax"] == "normalized_clipped" and not (a["alpha"] or 0) > 0:
        raise ValueError("qtx_attention.alpha must be positive with softmax='normalized_clipped'.")
    return a


def _clipped(scores: torch.Tensor, gamma, zeta) -> torch.Tensor:
    return torch.clip((zeta - gamma) * torch.softmax(scores, dim=-1) + gamma, 0.0, 1.0)


def softpick(scores: torch.Tensor, allowed: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``relu(e^x - 1) / (sum |e^x - 1| + eps)`` over the keys where ``allowed``."""
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row without keys
    shifted = torch.exp(scores - m) - torch.exp(-m)
    if allowed is not None:
        shifted = shifted.masked_fill(~allowed, 0.0)
    den = shifted.abs().sum(dim=-1, keepdim=True) + eps * torch.exp(-m)
    return torch.relu(shifted) / den


def attention_probs(
    scores: torch.Tensor,
    a: dict,
    allowed: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention weights of the configured normaliser, float32 (B, H, T, S). ``scores`` are
    masked already (a large negative value where ``allowed`` (B, 1|H, T, S) is False);
    ``allowed`` is read by ``softpick`` and ``normalized_clipped``, ``sink`` (H,) by ``sink``."""
    scores = scores.float()
    if a["softmax"] == "clipped":
        if a["alpha"] is not None:
            gamma, zeta = -a["alpha"] / float(a["softmax_T"] or scores.shape[-1]), 1.0
        else:
            gamma, zeta = a["gamma"], a["zeta"]
        return _clipped(scores, gamma, zeta)
    if a["softmax"] == "normalized_clipped":
        if allowed is None:
            n = torch.full((1, 1, 1, 1), float(scores.shape[-1]), device=scores.device)
        else:
            n = torch.clamp(allowed.float().sum(dim=-1, keepdim=True), min=1.0)
        g = a["alpha"] / n
        return _clipped(scores, -g, 1.0)
    if a["softmax"] == "off_by_one":
        m = torch.clamp(scores.amax(dim=-1, keepdim=True), min=0.0).detach()
        e = torch.exp(scores - m)
        return e / (torch.exp(-m) + e.sum(dim=-1, keepdim=True))
    if a["softmax"] == "sink":
        s = sink.float()[None, :, None, None]
        m = torch.maximum(scores.amax(dim=-1, keepdim=True), s).detach()
        e = torch.exp(scores - m)
        return e / (torch.exp(s - m) + e.sum(dim=-1, keepdim=True))
    if a["softmax"] == "softpick":
        return softpick(scores, allowed, a["softpick_eps"])
    return torch.softmax(scores, dim=-1)


class AttentionGate(nn.Module):
    """Gate probabilities ``pi`` broadcasting against the context (B, T, H, Dh): (B, T, H, 1)
    for token gates ((B, T, H, Dh) for ``elementwise``), (B, 1, H, 1) unconditional ones."""

    def __init__(self, a: dict, hidden_size: int, num_heads: int, head_dim: int, causal: bool):
        super().__init__()
        self.a, self.num_heads, self.head_dim, self.causal = a, num_heads, head_dim, causal
        dh = hidden_size // num_heads  # the per-head gates read the head's slice of x
        if a["gate"] in OUTPUT_GATES:
            width = num_heads if a["gate"] == "headwise" else num_heads * head_dim
            self.dense = nn.Linear(hidden_size, width, bias=a["pi_init"] is not None)
        elif a["gate_condition"] == "none":
            self.logit = nn.Parameter(torch.zeros(num_heads))
        elif a["gate"] == "all_heads_linear":
            self.dense = nn.Linear(hidden_size, num_heads)
        elif a["gate"] == "linear":
            self.weight = nn.Parameter(torch.zeros(num_heads, dh))
            self.bias = nn.Parameter(torch.zeros(num_heads))
        else:
            hidden = dh if a["gate"] == "mlp_wide" else max(dh // 4, 1)
            self.hidden_weight = nn.Parameter(torch.zeros(num_heads, dh, hidden))
            self.hidden_bias = nn.Parameter(torch.zeros(num_heads, hidden))
            self.out_weight = nn.Parameter(torch.zeros(num_heads, hidden))
            self.bias = nn.Parameter(torch.zeros(num_heads))

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.dense.bias is None else self.dense.bias.float()
        return nn.functional.linear(x, self.dense.weight.float(), bias)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        a, h = self.a, self.num_heads
        b, t, d = x.shape
        x = x.float()
        if a["gate"] in OUTPUT_GATES:
            logits = self._dense(x).reshape(b, t, h, -1)
            return self._finish(logits)
        if a["gate_condition"] == "none":
            logits = self.logit[None, None, :]
        elif a["gate"] == "all_heads_linear":
            logits = self._dense(x)
        else:
            xh = x.reshape(b, t, h, d // h)
            if a["gate"] == "linear":
                logits = torch.einsum("bthd,hd->bth", xh, self.weight.float()) + self.bias
            else:
                z = torch.einsum("bthd,hdk->bthk", xh, self.hidden_weight.float())
                z = torch.relu(z + self.hidden_bias)
                logits = torch.einsum("bthk,hk->bth", z, self.out_weight.float()) + self.bias
        if a["gate_condition"] == "head":
            m = x.new_ones(b, t, 1) if token_mask is None else token_mask.float()[..., None]
            if self.causal:
                num, den = torch.cumsum(logits * m, dim=1), torch.cumsum(m, dim=1)
            else:
                num, den = (logits * m).sum(1, keepdim=True), m.sum(1, keepdim=True)
            logits = num / torch.clamp(den, min=1.0)
        return self._finish(logits[..., None])

    def _finish(self, logits: torch.Tensor) -> torch.Tensor:
        pi = torch.sigmoid(logits)
        return pi / self.a["pi_init"] if self.a["gate_finetune"] else pi


def allowed_keys(mask: torch.Tensor | None, scores: torch.Tensor, swin: bool = False):
    """Bool (B, 1|H, T, S) of the keys each query may see, from HF's attention mask: boolean,
    additive (``finfo.min`` where masked), or Swin's (windows, N, N) shift mask (0 or -100);
    None when there is no mask."""
    if mask is None:
        return None
    if swin:
        windows, n = mask.shape[0], scores.shape[-1]
        allowed = (mask == 0)[None, :, None].expand(scores.shape[0] // windows, -1, -1, -1, -1)
        return allowed.reshape(-1, 1, n, n)
    mask = mask[..., : scores.shape[-1]]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def token_mask(mask: torch.Tensor | None, t: int, causal: bool) -> torch.Tensor | None:
    """Real tokens (B, T) from a 4-D attention mask (B, 1, T, S), additive or boolean."""
    if mask is None or mask.dim() != 4:
        return None
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    s = allowed.shape[-1]
    if causal:  # a padded position is masked as a key for every query, itself included
        idx = torch.arange(t, device=mask.device)
        return allowed[:, 0, idx, s - t + idx]
    return allowed[:, 0, 0, :]
