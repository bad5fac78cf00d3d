module fanout.local/etcd

go 1.23

require go.etcd.io/etcd/server/v3 v3.5.24
