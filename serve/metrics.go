package serve

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are the server's Prometheus series, on a registry of their own so
// several servers can live in one process (tests).
type metrics struct {
	reg *prometheus.Registry

	requests          *prometheus.CounterVec // adapter, endpoint, status
	promptTokens      *prometheus.CounterVec // adapter
	generationTokens  *prometheus.CounterVec // adapter
	ttft              prometheus.Histogram
	itl               prometheus.Histogram
	batchSequences    prometheus.Histogram
	batchTokens       prometheus.Histogram
	stepSeconds       prometheus.Histogram
	queueDepth        prometheus.Gauge
	activeSequences   prometheus.Gauge
	residentAdapters  prometheus.Gauge
	registered        prometheus.Gauge
	adapterLoads      prometheus.Counter
	adapterEvictions  prometheus.Counter
	adapterLoadSecs   prometheus.Histogram
	adapterUploadSecs prometheus.Histogram
	kvUsed            prometheus.Gauge
	kvCapacity        prometheus.Gauge
	kvBlocks          prometheus.Gauge
	kvUsedBlocks      prometheus.Gauge
	kvCachedBlocks    prometheus.Gauge
	kvEvicted         prometheus.Counter
	prefixQueried     prometheus.Counter
	prefixHit         prometheus.Counter
	preemptions       prometheus.Counter
	queueSeconds      prometheus.Histogram
	slotsTotal        prometheus.Gauge
}

func newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	latency := []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sbora_requests_total",
		Help: "Completed inference requests by adapter (model name), endpoint and status."}, []string{"adapter", "endpoint", "status"})
	m.promptTokens = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sbora_prompt_tokens_total",
		Help: "Prompt tokens processed, by adapter."}, []string{"adapter"})
	m.generationTokens = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sbora_generation_tokens_total",
		Help: "Tokens generated, by adapter."}, []string{"adapter"})
	m.ttft = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_time_to_first_token_seconds",
		Help: "Time from request arrival to its first generated token.", Buckets: latency})
	m.itl = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_inter_token_latency_seconds",
		Help: "Time between consecutive generated tokens of a request.", Buckets: latency})
	m.batchSequences = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_batch_sequences",
		Help: "Sequences per engine step.", Buckets: prometheus.ExponentialBuckets(1, 2, 9)})
	m.batchTokens = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_batch_tokens",
		Help: "Tokens per engine step.", Buckets: prometheus.ExponentialBuckets(1, 2, 12)})
	m.stepSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_step_seconds",
		Help: "Duration of one engine step.", Buckets: latency})
	m.queueDepth = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_queue_depth",
		Help: "Requests waiting for KV blocks or their adapters."})
	m.activeSequences = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_active_sequences",
		Help: "Sequences running (holding KV blocks)."})
	m.slotsTotal = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_max_running_sequences",
		Help: "Sequences that can run at once (--parallel)."})
	m.kvBlocks = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_kv_blocks",
		Help: "Blocks of the KV pool."})
	m.kvUsedBlocks = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_kv_blocks_used",
		Help: "KV blocks held by running sequences."})
	m.kvCachedBlocks = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_kv_blocks_cached",
		Help: "KV blocks holding prefix-cache content (held or reusable)."})
	m.kvEvicted = prometheus.NewCounter(prometheus.CounterOpts{Name: "sbora_prefix_cache_evicted_blocks_total",
		Help: "Cached KV blocks reclaimed for new tokens."})
	m.prefixQueried = prometheus.NewCounter(prometheus.CounterOpts{Name: "sbora_prefix_cache_queries_total",
		Help: "Prompt tokens looked up in the prefix cache."})
	m.prefixHit = prometheus.NewCounter(prometheus.CounterOpts{Name: "sbora_prefix_cache_hits_total",
		Help: "Prompt tokens found in the prefix cache (not recomputed)."})
	m.preemptions = prometheus.NewCounter(prometheus.CounterOpts{Name: "sbora_preemptions_total",
		Help: "Running sequences sent back to the queue because the KV pool was full (recomputed from the prefix cache when readmitted)."})
	m.queueSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_queue_seconds",
		Help: "Time from arrival to admission (KV blocks and adapters ready).", Buckets: latency})
	m.residentAdapters = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_resident_adapters",
		Help: "Adapters loaded in engine memory."})
	m.registered = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_registered_adapters",
		Help: "Adapters registered (resident or not)."})
	m.adapterLoads = prometheus.NewCounter(prometheus.CounterOpts{Name: "sbora_adapter_loads_total",
		Help: "Adapters made resident."})
	m.adapterEvictions = prometheus.NewCounter(prometheus.CounterOpts{Name: "sbora_adapter_evictions_total",
		Help: "Resident adapters evicted to make room (least recently used first)."})
	m.adapterLoadSecs = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_adapter_load_seconds",
		Help: "Time from claiming bank slots for an adapter to its first use (the upload, then the end of the step running meanwhile).", Buckets: latency})
	m.adapterUploadSecs = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sbora_adapter_upload_seconds",
		Help: "Time to read, check and copy an adapter into its bank slots, in the background while steps run.", Buckets: latency})
	m.kvUsed = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_kv_cache_used_tokens",
		Help: "Tokens cached for running sequences."})
	m.kvCapacity = prometheus.NewGauge(prometheus.GaugeOpts{Name: "sbora_kv_cache_capacity_tokens",
		Help: "Tokens the KV pool holds."})
	m.reg.MustRegister(m.requests, m.promptTokens, m.generationTokens, m.ttft, m.itl, m.batchSequences,
		m.batchTokens, m.stepSeconds, m.queueDepth, m.activeSequences, m.slotsTotal, m.residentAdapters, m.registered,
		m.adapterLoads, m.adapterEvictions, m.adapterLoadSecs, m.adapterUploadSecs, m.kvUsed, m.kvCapacity, m.kvBlocks, m.kvUsedBlocks,
		m.kvCachedBlocks, m.kvEvicted, m.prefixQueried, m.prefixHit, m.preemptions, m.queueSeconds,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}
