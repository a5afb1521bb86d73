"""Default locations of the stores, importable without loading the stores (and grpc) themselves."""

OCI_DIR = "./oci-store"

CONTAINERD_ADDRESS = "/run/containerd/containerd.sock"
CONTAINERD_NAMESPACE = "k8s.io"  # where kubelet's CRI plugin looks
CONTAINERD_SNAPSHOTTER = "overlayfs"
CONTAINERD_STAGING = "/var/lib/puller/staging"
CONTAINERD_ROOT = "/var/lib/containerd"  # checked for free space before a pull
CONTAINERD_LEASE_EXPIRY = 24 * 3600.0  # seconds: a pull's lease outlives a crashed puller by this much

OVERLAYBD_CONFIG = "/etc/overlaybd/overlaybd.json"
OVERLAYBD_CACHE_DIR = "/opt/overlaybd/registry_cache"
OVERLAYBD_CACHE_SIZE_GB = 4
