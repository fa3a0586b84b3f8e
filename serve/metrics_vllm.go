package serve

import (
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

// vllmCollector exports the scheduler's state under vLLM's metric names,
// which the Gateway API Inference Extension's endpoint picker reads by
// default to route by queue length, KV-cache use and LoRA affinity. Each
// is exactly one series, computed at scrape time from the scheduler's
// latest snapshot (a GaugeVec would keep stale label sets alive).
type vllmCollector struct {
	sched                           *scheduler
	model, cacheType                string
	maxLoRA, blockSize, blocks      int
	waiting, running, kvUsage, lora *prometheus.Desc
	cacheConfig                     *prometheus.Desc
}

func newVLLMCollector(s *scheduler, model string, maxLoRA int, cacheType string) *vllmCollector {
	return &vllmCollector{sched: s, model: model, cacheType: cacheType, maxLoRA: maxLoRA, blockSize: s.engine.Pool.BlockSize, blocks: s.engine.Pool.Blocks(),
		waiting: prometheus.NewDesc("vllm:num_requests_waiting", "Requests waiting to run (queued, or preempted and waiting for KV blocks or adapters).",
			[]string{"model_name"}, nil),
		running: prometheus.NewDesc("vllm:num_requests_running", "Requests with a sequence running.", []string{"model_name"}, nil),
		kvUsage: prometheus.NewDesc("vllm:kv_cache_usage_perc", "Fraction of the KV pool's blocks held by running sequences (0-1).",
			[]string{"model_name"}, nil),
		lora: prometheus.NewDesc("vllm:lora_requests_info", "Adapters of running and waiting requests; the value is the Unix time of the snapshot.",
			[]string{"max_lora", "running_lora_adapters", "waiting_lora_adapters"}, nil),
		cacheConfig: prometheus.NewDesc("vllm:cache_config_info", "KV cache layout: block size in tokens and the pool's blocks.",
			[]string{"block_size", "num_gpu_blocks", "cache_dtype"}, nil),
	}
}

func (c *vllmCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.waiting, c.running, c.kvUsage, c.lora, c.cacheConfig} {
		ch <- d
	}
}

func (c *vllmCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.sched.stats.Load()
	// Submitted requests the scheduler has not taken in yet wait too.
	inChannel := max(0, int(c.sched.queued.Load())-st.notAdmitted)
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	gauge(c.waiting, float64(st.waitingRequests+inChannel), c.model)
	gauge(c.running, float64(st.runningRequests), c.model)
	usage := 0.0
	if c.blocks > 0 {
		usage = float64(st.heldBlocks) / float64(c.blocks)
	}
	gauge(c.kvUsage, usage, c.model)
	gauge(c.lora, float64(st.at.UnixNano())/1e9, strconv.Itoa(c.maxLoRA), strings.Join(st.runningLoRA, ","), strings.Join(st.waitingLoRA, ","))
	gauge(c.cacheConfig, 1, strconv.Itoa(c.blockSize), strconv.Itoa(c.blocks), c.cacheType)
}
