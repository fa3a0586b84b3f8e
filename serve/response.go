package serve

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
)

// response turns a request's events into OpenAI's response shapes: one
// JSON body (collect) or server-sent events (stream), for n choices.
type response struct {
	s        *Server
	p        *genParams
	prep     *prepared
	req      *request
	endpoint string
	id       string
	created  int64
	promptLP []tokenLogprob
}

// choiceOutput gathers one choice.
type choiceOutput struct {
	text     strings.Builder
	logprobs []tokenLogprob
	finish   string
	usage    usage
	done     bool
	// streaming: started is whether the first chunk went out; held is
	// text kept back while it may still be a tool call.
	started  bool
	holding  bool
	held     strings.Builder
	heldLP   []tokenLogprob
	finished bool
}

func (o *response) object() string {
	switch {
	case o.endpoint == "chat" && o.p.stream:
		return "chat.completion.chunk"
	case o.endpoint == "chat":
		return "chat.completion"
	}
	return "text_completion"
}

// totalUsage counts the prompt once and every choice's completion.
func totalUsage(choices []*choiceOutput) usage {
	var u usage
	for _, c := range choices {
		u.PromptTokens = c.usage.PromptTokens
		u.CompletionTokens += c.usage.CompletionTokens
	}
	u.TotalTokens = u.PromptTokens + u.CompletionTokens
	return u
}

// next waits for the request's next choice event, recording the prompt's
// logprobs on the way; false when the client left (the scheduler reaps
// the request).
func (o *response) next(r *http.Request) (event, bool) {
	for {
		select {
		case ev := <-o.req.events:
			switch ev.kind {
			case evPromptLogprobs:
				o.promptLP = ev.logprobs
				continue
			case evAdmitted:
				continue
			}
			return ev, true
		case <-r.Context().Done():
			return event{}, false
		}
	}
}

func (o *response) newChoices() []*choiceOutput {
	choices := make([]*choiceOutput, o.p.n)
	for i := range choices {
		choices[i] = &choiceOutput{holding: o.p.stream && o.prep.tools != nil}
	}
	return choices
}

// collect writes the whole response once every choice is done.
func (o *response) collect(w http.ResponseWriter, r *http.Request) {
	choices := o.newChoices()
	for open := o.p.n; open > 0; {
		ev, ok := o.next(r)
		if !ok {
			return
		}
		c := choices[ev.choice]
		c.text.WriteString(ev.text)
		c.logprobs = append(c.logprobs, ev.logprobs...)
		if ev.kind != evDone {
			continue
		}
		if ev.err != nil {
			if r.Context().Err() == nil {
				writeError(w, ev.err)
			}
			return
		}
		c.finish, c.usage, c.done = ev.finish, ev.usage, true
		open--
	}
	list := make([]any, len(choices))
	for i, c := range choices {
		list[i] = o.choiceJSON(i, c)
	}
	writeJSON(w, http.StatusOK, map[string]any{"id": o.id, "object": o.object(), "created": o.created, "model": o.p.model,
		"choices": list, "usage": totalUsage(choices), "system_fingerprint": o.s.fingerprint()})
}

func (o *response) choiceJSON(i int, c *choiceOutput) map[string]any {
	text := c.text.String()
	if o.endpoint != "chat" {
		var lp any
		if o.p.logprobs {
			entries := c.logprobs
			if o.p.echo {
				entries = append(append([]tokenLogprob(nil), o.promptLP...), entries...)
			}
			lp = o.s.completionLogprobs(entries, o.p.topLogprobs > 0, 0)
		}
		if o.p.echo {
			text = o.prep.echoText + text
		}
		return map[string]any{"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish}
	}
	var lp any
	if o.p.logprobs {
		lp = o.s.chatLogprobs(c.logprobs)
	}
	msg := map[string]any{"role": "assistant", "content": text}
	finish := c.finish
	if calls := o.toolCalls(text); calls != nil {
		msg["content"] = nil
		msg["tool_calls"] = calls
		if finish == "stop" {
			finish = "tool_calls"
		}
	}
	return map[string]any{"index": i, "message": msg, "logprobs": lp, "finish_reason": finish}
}

// toolCalls parses text as tool calls in the template's format; nil when
// the request offered no tools or the text is not a call.
func (o *response) toolCalls(text string) []any {
	if o.prep.tools == nil {
		return nil
	}
	calls := o.s.chat.Tools.ParseToolCalls(text)
	if len(calls) == 0 {
		return nil
	}
	if o.prep.tools.single {
		calls = calls[:1]
	}
	out := make([]any, len(calls))
	for i, c := range calls {
		out[i] = map[string]any{"id": newID("call_"), "type": "function",
			"function": map[string]any{"name": c.Name, "arguments": c.Arguments}}
	}
	return out
}

// stream writes server-sent events in OpenAI's format, ending with
// "data: [DONE]". Errors after the first byte arrive as an error event,
// followed by [DONE]. With tools, text that may be a tool call is held
// back until it is known, then sent as tool_calls deltas or as content.
func (o *response) stream(w http.ResponseWriter, r *http.Request) {
	flusher, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("Connection", "keep-alive")
	w.WriteHeader(http.StatusOK)
	send := func(v any) bool {
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		enc.SetEscapeHTML(false)
		enc.Encode(v)
		if _, err := fmt.Fprintf(w, "data: %s\n\n", bytes.TrimSpace(buf.Bytes())); err != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}
	done := func() {
		fmt.Fprint(w, "data: [DONE]\n\n")
		if flusher != nil {
			flusher.Flush()
		}
	}
	choices := o.newChoices()
	for open := o.p.n; open > 0; {
		ev, ok := o.next(r)
		if !ok {
			return
		}
		c := choices[ev.choice]
		if !c.started {
			c.started = true
			if first := o.firstChunk(ev.choice); first != nil && !send(first) {
				return
			}
		}
		if ev.err != nil {
			if r.Context().Err() == nil {
				e := toAPIError(ev.err)
				send(map[string]any{"error": map[string]any{"message": e.Message, "type": e.Type, "param": nil, "code": nilIfEmpty(e.Code)}})
				done()
			}
			return
		}
		if c.holding {
			c.held.WriteString(ev.text)
			c.heldLP = append(c.heldLP, ev.logprobs...)
			if !o.s.chat.Tools.MayStartToolCall(c.held.String()) {
				c.holding = false
				if !send(o.textChunk(ev.choice, c.held.String(), c.heldLP)) {
					return
				}
			}
		} else if (ev.text != "" || len(ev.logprobs) > 0) && !send(o.textChunk(ev.choice, ev.text, ev.logprobs)) {
			return
		}
		if ev.kind != evDone {
			continue
		}
		c.finish, c.usage, c.done = ev.finish, ev.usage, true
		open--
		finish := c.finish
		if c.holding {
			text := c.held.String()
			if calls := o.toolCalls(text); calls != nil {
				for i, call := range calls {
					call.(map[string]any)["index"] = i
				}
				if !send(o.chunk(ev.choice, map[string]any{"tool_calls": calls}, o.chatLP(c.heldLP), nil)) {
					return
				}
				if finish == "stop" {
					finish = "tool_calls"
				}
			} else if (text != "" || len(c.heldLP) > 0) && !send(o.textChunk(ev.choice, text, c.heldLP)) {
				return
			}
		}
		if !send(o.chunk(ev.choice, map[string]any{}, nil, finish)) {
			return
		}
	}
	if o.p.includeUsage {
		send(map[string]any{"id": o.id, "object": o.object(), "created": o.created, "model": o.p.model, "choices": []any{},
			"usage": totalUsage(choices)})
	}
	done()
}

// firstChunk opens a choice: the assistant role (chat), or the echoed
// prompt with its logprobs (completions with echo); nil for none.
func (o *response) firstChunk(i int) map[string]any {
	if o.endpoint == "chat" {
		return o.chunk(i, map[string]any{"role": "assistant", "content": ""}, nil, nil)
	}
	if !o.p.echo {
		return nil
	}
	var lp any
	if o.p.logprobs && o.p.echo {
		lp = o.s.completionLogprobs(o.promptLP, o.p.topLogprobs > 0, 0)
	}
	return o.chunk(i, map[string]any{"text": o.prep.echoText}, lp, nil)
}

func (o *response) textChunk(i int, text string, lps []tokenLogprob) map[string]any {
	if o.endpoint == "chat" {
		return o.chunk(i, map[string]any{"content": text}, o.chatLP(lps), nil)
	}
	var lp any
	if o.p.logprobs {
		lp = o.s.completionLogprobs(lps, o.p.topLogprobs > 0, 0)
	}
	return o.chunk(i, map[string]any{"text": text}, lp, nil)
}

func (o *response) chatLP(lps []tokenLogprob) any {
	if !o.p.logprobs {
		return nil
	}
	return o.s.chatLogprobs(lps)
}

// chunk is one streamed choice update: a chat delta, or a completion's
// text (delta holds "text" then).
func (o *response) chunk(i int, delta map[string]any, logprobs, finish any) map[string]any {
	choice := map[string]any{"index": i, "logprobs": logprobs, "finish_reason": finish}
	if o.endpoint == "chat" {
		choice["delta"] = delta
	} else {
		text, _ := delta["text"].(string)
		choice["text"] = text
	}
	return map[string]any{"id": o.id, "object": o.object(), "created": o.created, "model": o.p.model,
		"system_fingerprint": o.s.fingerprint(), "choices": []any{choice}}
}
