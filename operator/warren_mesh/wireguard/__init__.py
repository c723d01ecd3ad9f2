"""The data planes: kernel WireGuard through netlink, wireguard-go through its UAPI socket, and a device in memory,
behind one interface."""
