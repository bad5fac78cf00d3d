module fanout.local/coredns

go 1.23

require github.com/coredns/coredns v1.12.0
