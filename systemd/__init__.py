"""The systemd unit, its drop-ins and the example settings, installed as package data of
``tierd.systemd`` so that ``tierd install-unit`` finds them in any installed copy (no code here)."""
