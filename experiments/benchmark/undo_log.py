"""MoCo with an undo log instead of the official ``queue.clone()``: the alternative the model used
until 2026-12-04, kept as a benchmark row (``moco-det undo-log``) so the choice stays measurable.

``l_neg`` is :class:`_NegativeLogits`, whose backward briefly puts the columns that the enqueue
overwrote back (an undo log of the N-column writes made since its forward), so the gradient uses
exactly the forward-time negatives without a K-column copy; any other in-place change of the
queue between forward and backward raises instead of giving a wrong gradient. It reads torch's
private ``Tensor._version``. docs/RESULTS.md has the measurement that retired it from the model.
"""

import weakref

import torch

from moco.modeling.losses import info_nce_logits
from moco.modeling.moco import MoCo
from moco.utils.dist import concat_all_gather, get_world_size


class _UndoLog:
    """In-place writes to ``queue`` since one forward: (column index, old columns), oldest first."""

    __slots__ = ("__weakref__", "entries", "expected_version", "peers", "queue")

    def __init__(self, queue, peers):
        self.queue, self.entries, self.peers = queue, [], peers
        self.expected_version = queue._version
        peers.add(self)


def _bump_versions(peers, queue, delta):
    for log in list(peers):
        if log.queue is queue:
            log.expected_version += delta


class _NegativeLogits(torch.autograd.Function):
    """``q @ queue`` whose backward sees the queue as it was at forward time, without a copy."""

    @staticmethod
    def forward(ctx, q, queue, log):
        ctx.log = log
        return q.mm(queue)

    @staticmethod
    def backward(ctx, grad):
        log = ctx.log
        queue = log.queue
        if queue._version != log.expected_version:
            raise RuntimeError(
                "MoCo: the queue was modified in place between forward and backward by something "
                "other than MoCo's enqueue (e.g. load_state_dict or queue.copy_); the gradient "
                "would use the wrong negatives, so run the forward again after the change"
            )
        before = queue._version
        with torch.no_grad():
            redo = []
            for idx, old in reversed(log.entries):  # undo newest first
                redo.append((idx, queue.index_select(1, idx)))
                queue.index_copy_(1, idx, old)
            grad_q = grad.mm(queue.t())
            for idx, current in reversed(redo):
                queue.index_copy_(1, idx, current)
        _bump_versions(log.peers, queue, queue._version - before)
        return grad_q, None, None


class UndoLogMoCo(MoCo):
    """:class:`moco.modeling.moco.MoCo` whose negatives are read without copying the queue."""

    name = "moco_undo_log"  # not registered: a benchmark row, not a MODEL.MECHANISM

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._undo_logs = weakref.WeakSet()  # of forwards whose graph may still run backward

    def __getstate__(self):  # pickling (torch.save of the module): the undo logs are transient
        state = self.__dict__.copy()
        state.pop("_undo_logs", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._undo_logs = weakref.WeakSet()

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        if get_world_size() > 1:
            keys = concat_all_gather(keys)
        idx = self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)
        queue = self.queue
        logs = [log for log in list(self._undo_logs) if log.queue is queue]
        for log in logs:  # the N columns about to be overwritten, for pending backwards
            log.entries.append((idx, queue.index_select(1, idx)))
        before = queue._version
        queue.index_copy_(1, idx, keys.T.to(queue.dtype))
        _bump_versions(self._undo_logs, queue, queue._version - before)
        self.queue_ptr.add_(keys.shape[0]).remainder_(self.K)

    def _logits(self, q, k):
        with torch.autocast(q.device.type, enabled=False):  # logits/T in fp32 even under AMP
            l_neg = None
            if q.requires_grad:  # the enqueue after the forward overwrites negatives backward needs
                l_neg = _NegativeLogits.apply(q, self.queue, _UndoLog(self.queue, self._undo_logs))
            return info_nce_logits(q, k, self.queue, self.T, l_neg=l_neg)
