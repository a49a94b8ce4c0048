"""A bank of LoRA adapters and their datasets: :class:`Bank` (open, members, profiles), its build
(:func:`build_bank`), PEFT adapter I/O (:mod:`~loramix.bank.peft_io`) and the Hub pull
(:mod:`~loramix.bank.hub`)."""
from loramix.bank.bank import Bank, BankError, Member, build_bank, open_bank

__all__ = ["Bank", "BankError", "Member", "build_bank", "open_bank"]
