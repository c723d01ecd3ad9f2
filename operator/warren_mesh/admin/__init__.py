"""What an administrator does to a mesh's store, once: migrate its keys, set up etcd's users and roles."""
