"""Plumbing every floor of the toolkit uses (moco/, detection/, experiments/, tools/): atomic files and\nrun-folder locks, processes and devices, config files as untrusted input, one-line CLI errors, and\nthe hooks every trainer shares (signals, writers). Nothing here knows MoCo."""

from moco.utils.lazy import lazy_exports

_EXPORTS = {
    "atomic_write": "file_io",
    "atomic_save": "file_io",
    "atomic_write_text": "file_io",
    "atomic_write_json": "file_io",
    "AtomicAppendFile": "file_io",
    "run_folder_lock": "file_io",
    "check_output_dir": "file_io",
    "check_folder_config": "file_io",
    "get_world_size": "dist",
    "get_rank": "dist",
    "concat_all_gather": "dist",
    "all_gather_with_grad": "dist",
    "Interrupted": "cli",
    "run_cli": "cli",
    "resume_command": "cli",
    "LaunchSpec": "launch",
    "resolve_launch": "launch",
    "launch_from_args": "launch",
    "check_local_processes": "launch",
    "launch_processes": "launch",
    "process_group_timeout": "launch",
    "setup_process": "launch",
    "resolve_device": "launch",
    "kernels": "launch",
    "roll_call": "launch",
    "load_config": "config_loading",
    "check_safe_yaml": "config_loading",
    "merge_config_file": "config_loading",
    "merge_opts": "config_loading",
    "key_hint": "config_loading",
    "SignalStop": "hooks",
    "stop_requested": "hooks",
    "AtomicJSONWriter": "hooks",
    "build_writers": "hooks",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
